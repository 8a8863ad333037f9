"""The HTTP layer of the real daemon under odd but possible input: chunked bodies (small ones
served, a 100 MB one refused with 413 and a JSON Err, not read to the end), pipelined requests
answered in order on one connection."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from harness.daemon import StowageDaemon

HEAD = b"POST %s HTTP/1.1\r\nHost: plugin.moby.localhost\r\n"


def read_response(sock: socket.socket, data: bytes = b"") -> tuple[int, dict[str, Any], bytes]:
    """One Content-Length framed response: from `data` first, then from `sock`. Returns
    (status, JSON body, bytes after the response)."""
    while True:
        try:
            return _parse(data)
        except _IncompleteError:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk


def connect(daemon: StowageDaemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.socket_path))
    return sock


def test_small_chunked_body_is_served(daemon: StowageDaemon) -> None:
    body = b'{"Name": "chunky", "Opts": null}\n'
    request = (
        HEAD % b"/VolumeDriver.Create"
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (10, body[:10])
        + b"%x;ext=1\r\n%s\r\n" % (len(body) - 10, body[10:])
        + b"0\r\n\r\n"
    )
    with contextlib.closing(connect(daemon)) as sock:
        sock.sendall(request)
        status, answer, _ = read_response(sock)
    assert (status, answer) == (200, {"Err": ""})
    assert daemon.client().get("chunky")["Err"] == ""


def test_100_mb_chunked_body_is_refused_with_413(daemon: StowageDaemon) -> None:
    piece = b"a" * (1024 * 1024)
    sent = 0
    with contextlib.closing(connect(daemon)) as sock:
        sock.sendall(HEAD % b"/VolumeDriver.Create" + b"Transfer-Encoding: chunked\r\n\r\n")
        start = b'{"Name": "v", "Opts": {"x": "'
        sock.sendall(b"%x\r\n%s\r\n" % (len(start), start))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 100 * 1024 * 1024:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        status, answer, _ = read_response(sock)
    assert status == 413
    assert answer == {"Err": "request body too large (limit 1048576 bytes)"}
    assert sent < 100 * 1024 * 1024  # refused early, not read to the end
    assert daemon.client().list() == {"Volumes": [], "Err": ""}


def test_pipelined_requests_are_answered_in_order(daemon: StowageDaemon) -> None:
    def request(path: bytes, payload: dict[str, object]) -> bytes:
        body = json.dumps(payload).encode() + b"\n"
        return HEAD % path + b"Content-Length: %d\r\n\r\n" % len(body) + body

    burst = (
        request(b"/VolumeDriver.Create", {"Name": "p1", "Opts": None})
        + request(b"/VolumeDriver.Get", {"Name": "p1"})
        + request(b"/VolumeDriver.Capabilities", {})
    )
    with contextlib.closing(connect(daemon)) as sock:
        sock.sendall(burst)
        status1, first, rest = read_response(sock)
        assert (status1, first) == (200, {"Err": ""})
        status2, second, rest = read_response(sock, rest)
        status3, third, _ = read_response(sock, rest)
    assert status2 == 200 and second["Volume"]["Name"] == "p1"
    assert (status3, third) == (200, {"Capabilities": {"Scope": "local"}})


class _IncompleteError(Exception):
    pass


def _parse(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    if b"\r\n\r\n" not in data:
        raise _IncompleteError
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(h.partition(b":")[::2] for h in lines[1:])
    length = int(next(v for k, v in headers.items() if k.lower() == b"content-length"))
    if len(rest) < length:
        raise _IncompleteError
    return int(lines[0].split()[1]), json.loads(rest[:length]), rest[length:]
