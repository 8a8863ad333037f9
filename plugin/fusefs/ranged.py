"""Ranged GETs of the FUSE filesystem through boto3: the answer is checked (the range asked
for, the version asked for) before a byte is used, and the body is read straight into the
caller's buffer or the parts of a cache file still missing. Blocking: worker threads only."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from plugin.fusefs.errors import RemoteError, StaleError
from plugin.s3.bodies import body_reader

#: Bytes per read from a GET body; large enough to keep per-call overhead small.
STREAM_CHUNK = 1 << 20


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def open_range(
    client: Any, bucket: str, key: str, start: int, end: int, etag: str | None
) -> tuple[Any, Callable[[memoryview], int]]:
    """Start a ranged GET; returns the body (to close) and its readinto."""
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "Range": f"bytes={start}-{end - 1}",
    }
    if etag:
        # Never splice bytes of a newer object version into an older cached one.
        kwargs["IfMatch"] = f'"{etag}"'
    r = client.get_object(**kwargs)
    body = r["Body"]
    got = _etag(r.get("ETag"))
    if etag and got and got != etag:
        # Some servers (rclone serve s3) ignore If-Match; check the answer ourselves.
        body.close()
        raise StaleError(f"get {key}: the object changed on the server")
    answered = r.get("ContentRange") or ""
    if not answered.startswith(f"bytes {start}-{end - 1}/") and not (
        start == 0 and not answered and r.get("ContentLength") == end
    ):
        # A server that ignored Range would put the object's first bytes at *start*.
        body.close()
        raise RemoteError(f"get {key}: asked for bytes {start}-{end - 1}, got {answered!r}")
    return body, body_reader(body, r)


def read_exactly(
    read_into: Callable[[memoryview], int],
    view: memoryview,
    key: str,
    pos: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fill *view* (object bytes from *pos* on); a body that ends early is an error."""
    done = 0
    while done < len(view):
        n = read_into(view[done:])
        if not n:
            raise RemoteError(f"get {key}: body ended at {pos + done}, expected {pos + len(view)}")
        done += n
        if progress is not None:
            progress(done)


def fetch_buffer(
    client: Any,
    bucket: str,
    key: str,
    start: int,
    end: int,
    buf: memoryview,
    etag: str | None,
    progress: Callable[[int], None] | None,
) -> None:
    body, read_into = open_range(client, bucket, key, start, end, etag)
    try:
        read_exactly(read_into, buf[: end - start], key, start, progress)
    finally:
        body.close()


def fetch_into(
    client: Any,
    bucket: str,
    key: str,
    start: int,
    end: int,
    fd: int,
    gaps: list[tuple[int, int]],
    etag: str | None,
) -> None:
    body, read_into = open_range(client, bucket, key, start, end, etag)
    try:
        buf = memoryview(bytearray(min(STREAM_CHUNK, end - start)))
        pos = start
        gi = 0
        while pos < end:
            n = min(len(buf), end - pos)
            read_exactly(read_into, buf[:n], key, pos)
            chunk = buf[:n]
            cend = pos + n
            while gi < len(gaps) and gaps[gi][1] <= pos:
                gi += 1
            j = gi
            while j < len(gaps) and gaps[j][0] < cend:
                s, e = max(gaps[j][0], pos), min(gaps[j][1], cend)
                view = chunk[s - pos : e - pos]
                while view:
                    w = os.pwrite(fd, view, s)
                    view = view[w:]
                    s += w
                j += 1
            pos = cend
    finally:
        body.close()
