"""The copy core's hand-signed fast path (plugin.s3.fast through CrtStore): small objects go
down in pipelined batches and up as single signed PUTs, with the same verification and the
same per-file fallback as the general path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server, leftovers, snapshot

from plugin.s3 import fast as s3fast
from plugin.s3.settings import S3Settings
from plugin.s3.store import ObjectInfo
from plugin.staging import CopyOptions, copy
from plugin.staging.engine import GET_BATCH, GET_BATCH_MAX, multipart_etag

pytestmark = pytest.mark.s3
pytest.importorskip("awscrt", reason="the fast path lives in the CRT store (pip install awscrt)")

from plugin.s3.crtstore import CrtStore  # noqa: E402

KiB = 1 << 10


def _opts(**kw: Any) -> CopyOptions:
    base: dict[str, Any] = {"chunk_size": 4 << 20, "jobs": 4, "retries": 2, "retry_delay": 0.05}
    base.update(kw)
    return CopyOptions(**base)


def _small_tree(root: Path, count: int) -> None:
    (root / "sub dir+plus").mkdir(parents=True)  # listing decodes "+" and "%2B" apart
    for i in range(count):
        where = root / "sub dir+plus" if i % 3 == 0 else root
        (where / f"f-{i:03d}-é.bin").write_bytes(os.urandom(i * 97 % (20 * KiB)))
    (root / "large.bin").write_bytes(os.urandom(GET_BATCH_MAX + 12345))  # not batched


def _fast_client(server: S3Server, bucket: str) -> s3fast.FastClient:
    creds = server.client()._request_signer._credentials  # the harness's explicit test keys
    return s3fast.FastClient(
        server.endpoint, bucket, "us-east-1", lambda: (creds.access_key, creds.secret_key, None)
    )


@pytest.fixture
def uploaded(rclone_s3: S3Server, bucket_name: str, tmp_path: Path) -> tuple[str, Path]:
    """A bucket holding a tree of 2.5 batches of small files (and one large file), put
    there through the fast PUT path; returns (bucket, local source tree)."""
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    _small_tree(src, GET_BATCH * 2 + GET_BATCH // 2)
    store = CrtStore(S3Settings(endpoint_url=rclone_s3.endpoint))
    try:
        up = copy(str(src), f"s3://{bucket}/tree", _opts(), store=store)
    finally:
        store.close()
    assert up.ok, up.errors
    return bucket, src


def test_small_objects_come_down_in_pipelined_batches(
    rclone_s3: S3Server, uploaded: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, src = uploaded
    # The fast PUT stored the s3fs metadata like the general path does.
    head = rclone_s3.client().head_object(Bucket=bucket, Key="tree/f-001-é.bin")
    assert {"mode", "mtime"} <= {name.lower() for name in head["Metadata"]}
    batches: list[int] = []
    real = s3fast.FastClient.get_many

    def spy(self: s3fast.FastClient, keys: list[str], max_size: int) -> Any:
        batches.append(len(keys))
        return real(self, keys, max_size)

    monkeypatch.setattr(s3fast.FastClient, "get_many", spy)
    store = CrtStore(S3Settings(endpoint_url=rclone_s3.endpoint))
    try:
        down = copy(f"s3://{bucket}/tree", str(tmp_path / "back"), _opts(), store=store)
    finally:
        store.close()
    assert down.ok, down.errors
    assert snapshot(tmp_path / "back", dirs_meta=False) == snapshot(src, dirs_meta=False)
    assert sum(batches) == GET_BATCH * 2 + GET_BATCH // 2  # every small file, not the large one
    assert max(batches) == GET_BATCH


class _CorruptFirstBody(CrtStore):
    """Flips a byte of the first body of every batch: verification must refuse it."""

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        got = super().get_many(bucket, keys, max_size)
        for i, item in enumerate(got):
            if item is not None and item[1]:
                info, body = item
                got[i] = (info, bytes([body[0] ^ 0xFF]) + body[1:])
                break
        return got


def test_a_corrupted_batched_body_is_never_renamed(
    rclone_s3: S3Server, uploaded: tuple[str, Path], tmp_path: Path
) -> None:
    bucket, _src = uploaded
    store = _CorruptFirstBody(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    back = tmp_path / "back"
    try:
        down = copy(f"s3://{bucket}/tree", str(back), _opts(retries=0), store=store)
    finally:
        store.close()
    assert not down.ok
    assert len(down.errors) == 3  # one per batch
    assert all("does not match ETag" in error.message for error in down.errors)
    for error in down.errors:
        assert not (back / error.path).exists()
    assert leftovers(back) == []


class _HalfAnswered(CrtStore):
    """A batch that broke half way: the rest must be fetched one by one."""

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        got = super().get_many(bucket, keys, max_size)
        return [item if i < len(got) // 2 else None for i, item in enumerate(got)]


def test_unanswered_batch_members_are_fetched_one_by_one(
    rclone_s3: S3Server, uploaded: tuple[str, Path], tmp_path: Path
) -> None:
    bucket, src = uploaded
    store = _HalfAnswered(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    try:
        down = copy(f"s3://{bucket}/tree", str(tmp_path / "back"), _opts(), store=store)
    finally:
        store.close()
    assert down.ok, down.errors
    assert snapshot(tmp_path / "back", dirs_meta=False) == snapshot(src, dirs_meta=False)


def test_pipelined_gets_after_a_dropped_connection_report_each_key(
    rclone_s3: S3Server, uploaded: tuple[str, Path]
) -> None:
    bucket, _src = uploaded
    fast = _fast_client(rclone_s3, bucket)
    try:
        keys = ["tree/f-001-é.bin", "tree/missing", "tree/f-002-é.bin"]
        first = fast.get_many(keys, GET_BATCH_MAX)
        assert [r[0] for r in first if not isinstance(r, Exception)] == [200, 404, 200]
        fast.close()  # the kept-alive connection is gone: the next batch reconnects
        again = fast.get_many(keys[:1], GET_BATCH_MAX)
        assert not isinstance(again[0], Exception) and again[0][2] == first[0][2]  # type: ignore[index]
        too_big = fast.get_many(["tree/large.bin", "tree/f-001-é.bin"], 1024)
        assert all(isinstance(r, s3fast.FastPathError) for r in too_big)
    finally:
        fast.close()


def test_ranged_get_fills_the_buffer_or_refuses(
    rclone_s3: S3Server, uploaded: tuple[str, Path]
) -> None:
    bucket, src = uploaded
    data = (src / "large.bin").read_bytes()
    fast = _fast_client(rclone_s3, bucket)
    etag = rclone_s3.client().head_object(Bucket=bucket, Key="tree/large.bin")["ETag"].strip('"')
    try:
        buf = bytearray(300_000)
        headers = fast.get_range_into("tree/large.bin", 123_456, memoryview(buf), etag=etag)
        assert bytes(buf) == data[123_456:423_456]
        assert headers["content-range"].endswith(f"/{len(data)}")
        with pytest.raises(s3fast.FastPathError):  # past the end: never a short buffer
            fast.get_range_into("tree/large.bin", len(data) - 10, memoryview(bytearray(100)))
        with pytest.raises(s3fast.FastPathError):  # another version than the one asked for
            fast.get_range_into("tree/large.bin", 0, memoryview(bytearray(10)), etag="0" * 32)
        with pytest.raises(s3fast.FastPathError):
            fast.get_range_into("tree/missing", 0, memoryview(bytearray(10)))
        # The connection survives refusals: the next ranged GET on it works.
        fast.get_range_into("tree/large.bin", 0, memoryview(buf))
        assert bytes(buf) == data[:300_000]
    finally:
        fast.close()


def test_multipart_upload_on_the_fast_path(rclone_s3: S3Server, bucket_name: str) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    key = "mp/big é+.bin"
    parts = [os.urandom(5 << 20), os.urandom(12345)]
    md5s = [hashlib.md5(p).digest() for p in parts]
    fast = _fast_client(rclone_s3, bucket)
    try:
        assert fast.list_uploads("mp/") == []
        uid = fast.create_multipart(key, [("x-amz-meta-stowage-mode", "33188")])
        assert [(k, u) for k, u, _ in fast.list_uploads("mp/")] == [(key, uid)]
        etags = [
            fast.upload_part(key, uid, n, p, m)
            for n, (p, m) in enumerate(zip(parts, md5s, strict=True), 1)
        ]
        assert [e.strip('"') for e in etags] == [m.hex() for m in md5s]
        etag = fast.complete_multipart(key, uid, list(enumerate(etags, 1)))
        assert etag.strip('"') == multipart_etag(md5s)
        assert fast.list_uploads("mp/") == []
        # S3 errors about a request's content do not switch the fast path off: bytes that do
        # not match their Content-MD5 (rclone then drops the whole upload), a finished upload.
        with pytest.raises(s3fast.FastPathError, match="NoSuchUpload"):
            fast.complete_multipart(key, uid, list(enumerate(etags, 1)))
        other = fast.create_multipart("mp/other", [])
        with pytest.raises(s3fast.FastPathError, match="HTTP 400 BadDigest"):
            fast.upload_part("mp/other", other, 1, b"not these bytes", md5s[1])
        assert fast.enabled
    finally:
        fast.close()
    got = rclone_s3.client().get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == b"".join(parts)
    assert {k.lower(): v for k, v in got["Metadata"].items()} == {"stowage-mode": "33188"}


def test_large_upload_never_needs_boto3(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """Create, parts and completion all go the fast path: a whole upload without importing
    boto3's client (0.3 s of a CLI copy)."""
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom((9 << 20) + 7))
    store = CrtStore(S3Settings(endpoint_url=rclone_s3.endpoint))
    try:
        up = copy(str(src), f"s3://{bucket}/big.bin", _opts(chunk_size=4 << 20), store=store)
        assert up.ok and up.bytes_copied == src.stat().st_size, up.errors
        assert store._boto is None
    finally:
        store.close()
    body = rclone_s3.client().get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert body == src.read_bytes()
