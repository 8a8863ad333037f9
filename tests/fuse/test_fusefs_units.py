"""Fast checks of the FUSE filesystem's pure parts and error boundary (no mount needed)."""

from __future__ import annotations

import errno
import logging
import stat
from typing import Any

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

pyfuse3 = pytest.importorskip("pyfuse3")
trio = pytest.importorskip("trio")

from plugin.fusefs import errors  # noqa: E402
from plugin.fusefs.cache import INITIAL_WINDOW, NEEDED_CHUNK, ReadAhead  # noqa: E402
from plugin.fusefs.entry import Ranges  # noqa: E402
from plugin.fusefs.inodes import (  # noqa: E402
    Attrs,
    Defaults,
    attrs_from_metadata,
    metadata_for,
)
from plugin.fusefs.operations import S3Operations  # noqa: E402
from plugin.s3.fast import FastClient  # noqa: E402
from plugin.s3.metadata import format_mtime, parse_mtime  # noqa: E402
from plugin.s3.xmldoc import parse_list as _parse_list  # noqa: E402

MiB = 1 << 20


def test_ranges_merge_clip_and_gaps() -> None:
    r = Ranges()
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 25)
    assert r.as_list() == [(10, 25), (30, 40)]
    assert r.missing(0, 50) == [(0, 10), (25, 30), (40, 50)]
    assert r.covers(12, 25)
    assert not r.covers(12, 26)
    r.add(5, 35)
    assert r.as_list() == [(5, 40)]
    r.clip(15)
    assert r.as_list() == [(5, 15)]
    r.clip(5)
    assert r.as_list() == []


def test_readahead_grows_on_sequential_reads_and_resets_on_seek() -> None:
    ra = ReadAhead(max_window=64 * MiB)
    assert not ra.observe(0, 128 * 1024)  # a first read proves nothing
    assert ra.window == INITIAL_WINDOW
    assert ra.observe(128 * 1024, 256 * 1024)
    assert ra.window == NEEDED_CHUNK  # megabytes ahead once sequential
    assert ra.observe(256 * 1024, 384 * 1024)
    assert ra.window == 2 * NEEDED_CHUNK
    # Slightly out of order (the kernel's async read-ahead) is still sequential.
    assert ra.observe(200 * 1024, 300 * 1024)
    for _ in range(10):
        ra.observe(ra.next_offset, ra.next_offset + MiB)
    assert ra.window == 64 * MiB
    ra.ahead_end = 90 * MiB
    assert not ra.observe(900 * MiB, 901 * MiB)
    assert ra.window == INITIAL_WINDOW
    assert ra.ahead_end == 0


def test_fast_list_parse_decodes_url_encoded_names_like_botocore() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>d%2F</Prefix><EncodingType>url</EncodingType>
  <IsTruncated>true</IsTruncated><NextContinuationToken>tok+/=</NextContinuationToken>
  <Contents><Key>d/a+b%25c%C3%BC</Key><LastModified>2026-11-23T14:36:34.500Z</LastModified>
    <ETag>"abc"</ETag><Size>42</Size></Contents>
  <CommonPrefixes><Prefix>d/sub+dir/</Prefix></CommonPrefixes>
</ListBucketResult>"""
    r = _parse_list(body)
    assert r["Contents"] == [
        {
            "Key": "d/a b%c\u00fc",
            "Size": 42,
            "ETag": '"abc"',
            "LastModifiedNs": 1_795_444_594_500_000_000,
        }
    ]
    assert r["CommonPrefixes"] == [{"Prefix": "d/sub dir/"}]
    assert r["IsTruncated"] is True
    assert r["NextContinuationToken"] == "tok+/="  # tokens are opaque, never decoded


def test_fast_request_signing_is_deterministic_and_encodes_the_query() -> None:
    hc = FastClient("http://127.0.0.1:9000", "bkt", "us-east-1", lambda: ("AK", "SK", None))
    req = hc.request_bytes(
        "", now=0, method="GET", query={"prefix": "a b/", "list-type": "2", "delimiter": "/"}
    )
    first = req.split(b"\r\n", 1)[0]
    assert first == b"GET /bkt?delimiter=%2F&list-type=2&prefix=a%20b%2F HTTP/1.1"
    assert req == hc.request_bytes(
        "", now=0, method="GET", query={"delimiter": "/", "list-type": "2", "prefix": "a b/"}
    )
    head = hc.request_bytes("dir/f +ü", now=0)
    assert head.startswith(b"HEAD /bkt/dir/f%20%2B%C3%BC HTTP/1.1\r\n")
    assert b"Credential=AK/19700101/us-east-1/s3/aws4_request" in head


def test_s3fs_metadata_round_trip() -> None:
    attrs = Attrs(
        mode=stat.S_IFREG | 0o640, uid=7, gid=8, size=3, mtime_ns=1_500_000_000_250_000_000
    )
    meta = metadata_for(attrs)
    assert meta == {"mode": "33184", "uid": "7", "gid": "8", "mtime": "1500000000.250000000"}
    back = attrs_from_metadata(
        {k.capitalize(): v for k, v in meta.items()},  # servers may capitalise keys
        size=3,
        last_modified_ns=0,
        default_mode=Defaults().file_mode,
        defaults=Defaults(),
    )
    assert back == attrs
    assert format_mtime(1_600_000_000 * 10**9) == "1600000000"
    assert parse_mtime("1600000000.5") == 1_600_000_000_500_000_000
    assert parse_mtime("garbage") is None


def test_missing_or_garbled_metadata_gets_defaults() -> None:
    d = Defaults(uid=1000, gid=1001, umask=0o027)
    a = attrs_from_metadata(
        {"mode": "oops", "mtime": "x"},
        size=1,
        last_modified_ns=42,
        default_mode=d.file_mode,
        defaults=d,
    )
    assert (a.mode, a.uid, a.gid, a.mtime_ns) == (stat.S_IFREG | 0o640, 1000, 1001, 42)
    # Permission bits only (some tools): the type comes from the key's shape.
    a = attrs_from_metadata(
        {"mode": "493"}, size=0, last_modified_ns=0, default_mode=d.dir_mode, defaults=d
    )
    assert a.mode == stat.S_IFDIR | 0o755


class _ExplodingFs:
    ttl = 1.0

    async def getattr(self, inode: int) -> Any:
        raise RuntimeError("bug in a handler")

    async def readlink(self, inode: int) -> Any:
        raise errors.NotFoundError("gone")

    async def unlink(self, parent: int, name: bytes) -> Any:
        raise errors.RemoteError("S3 is down")

    async def read(self, fh: int, off: int, size: int) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda ops: ops.getattr(5, None), errno.EIO),
        (lambda ops: ops.readlink(5, None), errno.ENOENT),
        (lambda ops: ops.unlink(1, b"x", None), errno.EIO),
        (lambda ops: ops.read(1, 0, 10), errno.ENOSPC),
        (lambda ops: ops.link(5, 1, b"x", None), errno.EPERM),
        (lambda ops: ops.mknod(1, b"fifo", stat.S_IFIFO | 0o644, 0, None), errno.EOPNOTSUPP),
    ],
)
def test_handler_errors_become_fuse_errors_not_crashes(
    call: Any, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    ops = S3Operations(_ExplodingFs())  # type: ignore[arg-type]

    async def _run() -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call(ops)
        assert exc.value.errno == expected

    with caplog.at_level(logging.DEBUG, logger="plugin.fusefs.operations"):
        trio.run(_run)
    if expected == errno.EIO and "bug" in caplog.text:
        assert "Traceback" in caplog.text  # unexpected errors are logged with their stack
