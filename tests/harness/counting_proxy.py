"""A loopback TCP proxy in front of an S3 server that records every HTTP request line, so a
test can count the HEADs and GETs a mount makes (pipelined requests included).

Request lines are found by scanning everything the client sends, PUT payloads included: a
test's bodies must not contain text that looks like a request line (plain bytes never do)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from harness.s3servers import S3Server

_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/\S*) HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: str


@dataclass(frozen=True)
class Proxied:
    """What fusemount.start_mount needs of a server: the proxy's endpoint, the rest the
    real server's."""

    endpoint: str
    server: S3Server

    @property
    def supports_dir_markers(self) -> bool:
        return self.server.supports_dir_markers

    def client(self, **config: Any) -> Any:
        return self.server.client(**config)


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._refuse = False
        self._start(self._accept)

    @property
    def refuse(self) -> bool:
        """While True the server is unreachable: connections are cut, new ones closed."""
        return self._refuse

    @refuse.setter
    def refuse(self, value: bool) -> None:
        self._refuse = value
        if value:
            self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._start(self._pump, client, server, True)
            self._start(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if from_client:
                    pending += data
                    last = 0
                    for m in _REQUEST_LINE.finditer(pending):
                        url = urlsplit(m.group(2).decode())
                        with self._lock:
                            self.requests.append(
                                Request(m.group(1).decode(), unquote(url.path), url.query)
                            )
                        last = m.end()
                    pending = pending[last:][-4096:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def count(self, method: str, path: str | None = None, *, listing: bool = False) -> int:
        """Requests of *method* (for *path* if given); GETs are objects unless *listing*."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == method
                and (path is None or r.path == path)
                and (method != "GET" or ("list-type" in r.query) == listing)
            )

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("the proxy did not see the expected requests in time")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._cut_all()
        for t in self._threads:
            t.join(timeout=5)


@contextlib.contextmanager
def counting_proxy(upstream: str) -> Iterator[CountingProxy]:
    proxy = CountingProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
