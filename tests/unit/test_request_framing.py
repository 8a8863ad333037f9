"""plugin.httpworker.RequestFramer: where a request ends, however its bytes arrive. The worker
commits a thread only to a complete request, so this decides what a slow client can hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin.httpworker import MAX_BODY_BYTES, RequestFramer, _RejectError

HEAD = b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: x\r\n"


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos : pos + size]
        if not piece:
            break
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        pos += len(piece)
    if pos < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:])
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


requests = st.builds(
    lambda body, sizes, use_chunked: (
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
        if use_chunked
        else HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    ),
    st.binary(max_size=300),
    st.lists(st.integers(min_value=1, max_value=50), max_size=10),
    st.booleans(),
)


@given(request=requests, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_end_is_found_exactly_whatever_the_pieces(request: bytes, cuts: list[int]) -> None:
    framer = RequestFramer()
    buf = bytearray()
    points = sorted({min(c, len(request)) for c in cuts} | {len(request)})
    start = 0
    found = None
    for point in points:
        buf += request[start:point]
        start = point
        found = framer.feed(buf)
        if point < len(request):
            assert found is None
    assert found == len(request)
    assert framer.path == "/VolumeDriver.Get"
    # Pipelined: the next request's bytes do not change where the first one ends.
    fresh = RequestFramer()
    assert fresh.feed(bytearray(request + request)) == len(request)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (HEAD + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY_BYTES + 1), 413),
        (HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501),
        (HEAD + b"Content-Length: -1\r\n\r\n", 400),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (HEAD + b"X: " + b"a" * 40_000, 431),
    ],
)
def test_refusals(raw: bytes, status: int) -> None:
    with pytest.raises(_RejectError) as info:
        RequestFramer().feed(bytearray(raw))
    assert info.value.status == status
