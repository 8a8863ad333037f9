"""The gunicorn worker class of `stowage serve`: requests are read whole before any thread
is committed to them, and quick endpoints never queue behind slow ones.

Why not gunicorn's `gthread`: it hands every accepted connection to its bounded thread pool,
where the thread waits for the first bytes (5 s) and then reads the request with blocking
calls. Eight clients sending a byte per second, or a few hundred idle connections, therefore
occupy every thread, and a Mount waiting two minutes for stage-in holds one too; dockerd's Get
and List then time out (issue 12). Here:

- one event loop (the worker's main thread) accepts connections and reads them without
  blocking until a whole request (headers and body, Content-Length or chunked) is buffered; an
  idle connection costs a file descriptor, no thread. A request must arrive within
  `REQUEST_READ_TIMEOUT_S` of its first byte and fit the size limits, else it is answered with
  a JSON error (413, 431) or dropped;
- complete requests go to one of two thread pools: paths the application names as quick (Get,
  List, Path, Capabilities, Activate: answered from memory) to a small pool of their own, all
  others (Create, Mount, ...: may wait up to Docker's two minutes) to a large one. A Mount
  waiting for stage-in holds a thread of the large pool only;
- the response is written by that thread with a send timeout, and the connection goes back to
  the loop to wait for its next request (keep-alive, as dockerd uses).

gunicorn's own request parser and WSGI response code do the HTTP; this module only decides
when a request is complete and where it runs. The pool threads are daemon threads, so a Mount
still waiting at shutdown never delays the exit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gunicorn import http
from gunicorn.http import wsgi
from gunicorn.workers import base

#: Bodies of dockerd's requests are a few hundred bytes; the API answers anything larger than
#: this with 413 (plugin.api.MAX_REQUEST_BYTES is the same limit for the Flask app).
MAX_BODY_BYTES = 1024 * 1024
#: Request line plus headers.
MAX_HEAD_BYTES = 32 * 1024
#: Whole request on the wire (chunked framing included): what one connection may buffer.
MAX_RAW_BYTES = MAX_HEAD_BYTES + MAX_BODY_BYTES + 64 * 1024
#: From a request's first byte to its last; dockerd sends a request in one write.
REQUEST_READ_TIMEOUT_S = 10.0
#: A client that does not take its (small) response within this is dropped.
SEND_TIMEOUT_S = 10.0
#: Threads of the pool for quick endpoints (answered from memory; CPU-bound under the GIL).
QUICK_THREADS = 4
#: How often the loop wakes at the least: heartbeat to the arbiter, expiry of deadlines.
TICK_S = 0.5
#: Connections accepted per wake-up of the loop.
ACCEPT_BATCH = 64

_CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"


class _RejectError(Exception):
    """The request cannot be served; answered with `status` and a JSON Err, then closed."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RequestFramer:
    """Finds where the first HTTP/1.1 request in a growing buffer ends, incrementally (a
    chunked body arriving in many pieces is scanned once). Only framing: the request itself
    is parsed, and judged, by gunicorn's parser."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._pos = 0  # scanned up to here
        self._phase = "head"  # head | length | chunk-size | chunk-data | trailer
        self._end = 0  # end of the body (length) or of the current chunk's data
        self._body = 0  # decoded body bytes so far
        self.path = ""

    def feed(self, buf: bytearray) -> int | None:
        """The end offset of the first complete request in `buf`, or None if more is needed.
        `buf` only ever grows between calls (until `reset`). Raises _RejectError."""
        if len(buf) > MAX_RAW_BYTES:
            raise _too_large()
        if self._phase == "head" and not self._head(buf):
            return None
        while True:
            if self._phase == "length":
                return self._end if len(buf) >= self._end else None
            if self._phase == "chunk-size":
                line = self._line(buf)
                if line is None:
                    return None
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise _RejectError(400, "Bad Request", "invalid chunk size in request body")
                size = int(size_text, 16)
                self._body += size
                if self._body > MAX_BODY_BYTES:
                    raise _too_large()
                if size == 0:
                    self._phase = "trailer"
                else:
                    self._phase, self._end = "chunk-data", self._pos + size
            elif self._phase == "chunk-data":
                if len(buf) < self._end + 2:
                    return None
                if buf[self._end : self._end + 2] != b"\r\n":
                    raise _RejectError(400, "Bad Request", "chunk data not followed by CRLF")
                self._pos, self._phase = self._end + 2, "chunk-size"
            else:  # trailer: header lines up to an empty one
                line = self._line(buf)
                if line is None:
                    return None
                if not line:
                    return self._pos

    def _line(self, buf: bytearray) -> bytes | None:
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > 4096:
                raise _RejectError(400, "Bad Request", "line too long in chunked request body")
            return None
        line = bytes(buf[self._pos : end])
        self._pos = end + 2
        return line

    def _head(self, buf: bytearray) -> bool:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _RejectError(
                    431, "Request Header Fields Too Large", "request headers too large"
                )
            return False
        if end > MAX_HEAD_BYTES:
            raise _RejectError(431, "Request Header Fields Too Large", "request headers too large")
        request_line, *lines = bytes(buf[:end]).split(b"\r\n")
        parts = request_line.split(b" ")
        self.path = parts[1].decode("latin-1") if len(parts) == 3 else ""
        length: bytes | None = None
        codings: list[bytes] = []
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                continue  # gunicorn's parser rejects it
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if length is not None and value != length:
                    raise _RejectError(400, "Bad Request", "conflicting Content-Length headers")
                length = value
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
        body_start = end + 4
        if codings:
            if length is not None:
                raise _RejectError(
                    400, "Bad Request", "both Content-Length and Transfer-Encoding given"
                )
            if codings[-1] != b"chunked":
                raise _RejectError(501, "Not Implemented", "unsupported Transfer-Encoding")
            self._pos, self._phase = body_start, "chunk-size"
            return True
        if length is None:
            size = 0
        elif not length.isdigit() or len(length) > 18:
            raise _RejectError(400, "Bad Request", "invalid Content-Length")
        else:
            size = int(length)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        self._phase, self._end = "length", body_start + size
        return True


def _too_large() -> _RejectError:
    return _RejectError(
        413,
        "Request Entity Too Large",
        f"request body too large (limit {MAX_BODY_BYTES} bytes)",
    )


class _Pool:
    """A thread pool of daemon threads, started as needed up to `size`: unlike
    concurrent.futures', its threads never delay the process's exit."""

    def __init__(self, name: str, size: int, run: Callable[[Any], None]) -> None:
        self._name = name
        self._size = size
        self._run = run
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads = 0
        self._lock = threading.Lock()

    def submit(self, item: Any) -> None:
        self._queue.put(item)
        if self._idle.acquire(blocking=False):
            return  # an idle thread takes it
        with self._lock:
            if self._threads < self._size:
                self._threads += 1
                threading.Thread(
                    target=self._loop, name=f"{self._name}-{self._threads}", daemon=True
                ).start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            self._run(item)
            self._idle.release()


class _Conn:
    def __init__(self, sock: socket.socket, client: Any, server: Any) -> None:
        self.sock = sock
        self.client = client
        self.server = server
        self.buf = bytearray()
        self.framer = RequestFramer()
        self.deadline = 0.0
        self.reading = False  # a request has begun arriving
        self.busy = False  # handed to a pool thread


class PluginWorker(base.Worker):  # type: ignore[misc]  # untyped base class
    """See the module docstring. Configured by gunicorn's `threads` (size of the pool for slow
    endpoints), `worker_connections` (open connections at most), `keepalive` (seconds an idle
    connection is kept) and `graceful_timeout`."""

    def init_process(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._finished: queue.SimpleQueue[tuple[_Conn, bool]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._conns: set[_Conn] = set()
        self._busy = 0
        self._accepting = False
        self._quick_paths: frozenset[str] = frozenset()
        self._quick = _Pool("quick", QUICK_THREADS, self._serve)
        self._slow = _Pool("request", max(1, self.cfg.threads), self._serve)
        super().init_process()

    # -- the event loop ---------------------------------------------------------------------

    def run(self) -> None:
        self._quick_paths = frozenset(getattr(self.app, "quick_paths", ()))
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # gunicorn's signal wake-up pipe (set_wakeup_fd): SIGTERM ends the wait at once.
        self._selector.register(self.PIPE[0], selectors.EVENT_READ, None)
        self._set_accepting(True)
        last_tick = 0.0
        while self.alive:
            self._poll(TICK_S)
            self._set_accepting(len(self._conns) < self.cfg.worker_connections)
            now = time.monotonic()
            if now - last_tick >= TICK_S:  # not per event: both cost O(connections) or a syscall
                last_tick = now
                self.notify()
                self._expire()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
        self._shutdown()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False

    def _poll(self, timeout: float) -> None:
        try:
            events = self._selector.select(timeout)
        except InterruptedError:
            return
        for key, _mask in events:
            if key.data is None:
                self._drain_wakeups(key.fd)
            elif isinstance(key.data, _Conn):
                self._readable(key.data)
            else:
                self._accept(key.fileobj)  # type: ignore[arg-type]
        while True:
            try:
                conn, keep = self._finished.get_nowait()
            except queue.Empty:
                break
            self._busy -= 1
            conn.busy = False
            self._returned(conn, keep)

    def _drain_wakeups(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass

    def _set_accepting(self, accepting: bool) -> None:
        if accepting == self._accepting:
            return
        for listener in self.sockets:
            if accepting:
                listener.setblocking(False)
                self._selector.register(listener, selectors.EVENT_READ, "listener")
            else:
                self._selector.unregister(listener)
        self._accepting = accepting

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._conns) >= self.cfg.worker_connections:
                return
            try:
                sock, client = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    return
                raise
            sock.setblocking(False)
            conn = _Conn(sock, client, listener.getsockname())
            conn.deadline = time.monotonic() + self.cfg.keepalive
            self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if not conn.reading:
            conn.reading = True
            conn.deadline = time.monotonic() + REQUEST_READ_TIMEOUT_S
        conn.buf += data
        self._try_dispatch(conn)

    def _try_dispatch(self, conn: _Conn) -> None:
        try:
            end = conn.framer.feed(conn.buf)
        except _RejectError as exc:
            self._reject(conn, exc)
            return
        if end is None:
            return
        raw = bytes(conn.buf[:end])
        del conn.buf[:end]
        path = conn.framer.path.split("?", 1)[0]
        conn.framer.reset()
        self._selector.unregister(conn.sock)
        conn.busy = True
        self._busy += 1
        pool = self._quick if path in self._quick_paths else self._slow
        pool.submit((conn, raw))

    def _returned(self, conn: _Conn, keep: bool) -> None:
        """A pool thread answered a request of `conn`: wait for its next one, or close."""
        if not keep or not self.alive:
            self._close(conn)
            return
        try:
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._close(conn)
            return
        conn.reading = bool(conn.buf)
        conn.deadline = time.monotonic() + (
            REQUEST_READ_TIMEOUT_S if conn.reading else self.cfg.keepalive
        )
        if conn.buf:  # a pipelined request arrived with the previous one
            self._try_dispatch(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns if not c.busy and c.deadline < now]:
            if conn.reading:
                self.log.debug("dropping a client that did not finish its request in time")
            self._close(conn)

    def _reject(self, conn: _Conn, exc: _RejectError) -> None:
        body = json.dumps({"Err": str(exc)}).encode()
        head = (
            f"HTTP/1.1 {exc.status} {exc.reason}\r\nContent-Type: {_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.log.warning("rejected a request: %s", exc)
        with contextlib.suppress(OSError):
            conn.sock.send(head + body)  # small: fits the socket buffer
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _shutdown(self) -> None:
        """Stop accepting, drop idle connections, give requests in flight the grace period."""
        self._set_accepting(False)
        for listener in self.sockets:
            listener.close()
        deadline = time.monotonic() + max(0.0, self.cfg.graceful_timeout - 1.0)
        while self._busy and time.monotonic() < deadline:
            for conn in [c for c in self._conns if not c.busy]:
                self._close(conn)
            self.notify()
            self._poll(min(TICK_S, max(0.0, deadline - time.monotonic())))
        for conn in list(self._conns):
            self._close(conn)

    # -- in a pool thread -------------------------------------------------------------------

    def _serve(self, item: tuple[_Conn, bytes]) -> None:
        conn, raw = item
        keep = False
        req = None
        try:
            conn.sock.settimeout(SEND_TIMEOUT_S)
            # The parser reads only these bytes, never the socket: the request is complete.
            parser = http.get_parser(self.cfg, [raw], conn.client)
            req = next(parser)
            if req:
                keep = self._handle(req, conn)
        except (StopIteration, http.errors.NoMoreData):
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, None):
                self.log.exception("socket error while answering a request")
        except Exception as exc:
            try:
                self.handle_error(req, conn.sock, conn.client, exc)
            except Exception:
                self.log.exception("cannot send an error response")
        self._finished.put((conn, keep))
        with contextlib.suppress(OSError):  # a full pipe: the loop is awake anyway
            os.write(self._wake_w, b"\0")

    def _handle(self, req: Any, conn: _Conn) -> bool:
        """Run the WSGI app for one request; True if the connection stays open."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            if not self.alive or not self.cfg.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
