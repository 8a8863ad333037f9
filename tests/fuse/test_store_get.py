"""Ranged GETs of ObjectStore against a scripted HTTP server on loopback: a server that
stalls, hangs up early or ignores Range gives a clear error, never wrong or missing bytes."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

trio = pytest.importorskip("trio")
pytest.importorskip("boto3")

from harness.s3servers import aws_env  # noqa: E402

from plugin.fusefs.errors import RemoteError, StaleError  # noqa: E402
from plugin.fusefs.store import ObjectStore  # noqa: E402
from plugin.s3 import client as s3client  # noqa: E402

MiB = 1 << 20
DATA = os.urandom(3 * MiB + 123)
ETAG = "0123456789abcdef0123456789abcdef"

#: How the server answers a GET for bytes [start, end]: writes to the connection.
Script = Callable[[socket.socket, int, int], None]


def _headers(status: str, start: int, end: int, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {end - start + 1}\r\n"
        f'ETag: "{ETAG}"\r\nContent-Range: bytes {start}-{end}/{len(DATA)}\r\n{extra}\r\n'
    ).encode()


def honest(conn: socket.socket, start: int, end: int) -> None:
    # Headers and the first body bytes in one segment, the rest in pieces.
    body = DATA[start : end + 1]
    conn.sendall(_headers("206 Partial Content", start, end) + body[:5000])
    for pos in range(5000, len(body), 256 * 1024):
        conn.sendall(body[pos : pos + 256 * 1024])


def stalls(conn: socket.socket, start: int, end: int) -> None:
    conn.sendall(_headers("206 Partial Content", start, end) + DATA[start : start + 1000])
    time.sleep(4)  # longer than the client's read timeout


def hangs_up(conn: socket.socket, start: int, end: int) -> None:
    conn.sendall(_headers("206 Partial Content", start, end) + DATA[start : start + 100_000])


def ignores_range(conn: socket.socket, start: int, end: int) -> None:
    conn.sendall(
        f'HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\nETag: "{ETAG}"\r\n\r\n'.encode() + DATA
    )


def replaced(conn: socket.socket, start: int, end: int) -> None:
    head = _headers("206 Partial Content", start, end).replace(ETAG.encode(), b"f" * 32)
    conn.sendall(head + DATA[start : end + 1])


class ScriptedServer:
    """Answers every request on 127.0.0.1 with `script`, one connection at a time."""

    def __init__(self) -> None:
        self.script: Script = honest
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                ranges = [
                    line.split("=", 1)[1]
                    for line in request.decode("latin-1").split("\r\n")
                    if line.lower().startswith("range:")
                ]
                start, end = (int(x) for x in ranges[0].split("-")) if ranges else (0, 0)
                with contextlib.suppress(OSError):  # the client gave up first
                    self.script(conn, start, end)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    for name, value in aws_env().items():  # explicit keys; no metadata service, no config
        monkeypatch.setenv(name, value)
    srv = ScriptedServer()
    yield srv
    srv.close()


def make_store(port: int) -> ObjectStore:
    settings = s3client.S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        read_timeout=0.8,  # below a second: SO_RCVTIMEO gets the microseconds too
        connect_timeout=1,
        max_attempts=1,
    )
    return ObjectStore(s3client.make_s3_client(settings), "bucket")


def get(port: int, start: int, end: int) -> bytes:
    store = make_store(port)
    buf = memoryview(bytearray(end - start))

    async def _run() -> None:
        with trio.fail_after(20):
            await store.fetch_buffer("key", start, end, buf, etag=ETAG)

    trio.run(_run)
    return bytes(buf)


@pytest.mark.parametrize(("start", "end"), [(0, 3 * MiB), (MiB + 7, len(DATA)), (5, 4000)])
def test_ranged_get_fills_the_buffer_exactly(server: ScriptedServer, start: int, end: int) -> None:
    assert get(server.port, start, end) == DATA[start:end]


def test_stalled_server_times_out(server: ScriptedServer) -> None:
    server.script = stalls
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"(?i)timed out|no data"):
        get(server.port, 0, 2 * MiB)
    assert time.monotonic() - started < 3  # the read timeout, not the server's patience


def test_server_hanging_up_early_is_an_error(server: ScriptedServer) -> None:
    server.script = hangs_up
    with pytest.raises(RemoteError, match="body ended"):
        get(server.port, 0, 2 * MiB)


def test_server_ignoring_range_is_refused(server: ScriptedServer) -> None:
    server.script = ignores_range
    with pytest.raises(RemoteError, match="asked for bytes 1048576-2097151"):
        get(server.port, MiB, 2 * MiB)


def test_replaced_object_is_stale(server: ScriptedServer) -> None:
    server.script = replaced
    with pytest.raises(StaleError):
        get(server.port, 0, MiB)
