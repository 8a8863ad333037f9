"""Reading boto3 GET bodies straight into the caller's buffer.

botocore's read() copies every byte two or three times on its way up (http.client ->
urllib3 -> bytes); reading the http.client response straight into our buffer saves that CPU,
which a 2-core machine spends on the data path.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from typing import Any

from plugin.s3.transport import read_exact


def body_reader(body: Any, response: dict[str, Any]) -> Callable[[memoryview], int]:
    """readinto for a GET body. botocore's read() copies every byte two or three times on
    its way up (http.client -> urllib3 -> bytes); reading the http.client response straight
    into our buffer saves that CPU, which a 2-core machine spends on the data path. Falls
    back to read() when the layout is not the expected one or the body is encoded."""
    raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    if isinstance(raw, http.client.HTTPResponse) and not headers.get("content-encoding"):
        sock = getattr(getattr(raw.fp, "raw", None), "_sock", None)
        # Plain TCP only: TLS sockets (ssl.SSLSocket, a subclass) take no recv flags.
        if type(sock) is socket.socket and raw.length is not None and not raw.chunked:
            return SocketBody(raw, sock).read_into
        return raw.readinto

    def _read(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return _read


class SocketBody:
    """Reads a body of known length straight from the connection's socket (see
    `plugin.s3.transport.read_exact`: one syscall and one release of the GIL per buffer
    instead of one per arriving segment; eight GET threads and the FUSE loop share the GIL, and each
    reacquisition is a chance for the others to stall, which left both cores idle a fifth
    of a cold read).

    Only for a body read to its end or abandoned: http.client's own bookkeeping is
    bypassed, so the caller closes the response (and with it the connection) afterwards.
    """

    def __init__(self, response: http.client.HTTPResponse, sock: socket.socket) -> None:
        self._response = response
        self._sock = sock
        self._left = response.length or 0

    def read_into(self, view: memoryview) -> int:
        want = min(len(view), self._left)
        fp = self._response.fp
        if not want or fp is None:
            return 0
        n = read_exact(fp, self._sock, view[:want])
        self._left -= n
        return n
