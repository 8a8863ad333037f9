"""Small single PUTs of the FUSE process go through the hand-signed fast path (a small file's
create is mostly its PUT: 1.0-1.3 ms there against 2.4-2.8 ms through boto3), and fall back
to boto3 when the fast path refuses; the stored object is the same either way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

trio = pytest.importorskip("trio")

from harness.s3servers import S3Server  # noqa: E402

from plugin.fusefs.store import FAST_PUT_MAX, ObjectStore  # noqa: E402
from plugin.s3.fast import from_boto3_client  # noqa: E402


@pytest.fixture
def store(rclone_server: S3Server) -> Iterator[ObjectStore]:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client()
    made = ObjectStore(client, bucket)
    made.fast_client = from_boto3_client(client, bucket)
    assert made.fast_client is not None
    try:
        yield made
    finally:
        made.fast_client.close()


def _refuse_boto3(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    used: list[str] = []

    def put_object(**kwargs: Any) -> Any:
        used.append(kwargs["Key"])
        raise AssertionError("a small PUT went through boto3")

    monkeypatch.setattr(store.client, "put_object", put_object)
    return used


def test_small_put_goes_the_fast_way_with_metadata_and_type(
    rclone_server: S3Server, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = store.bucket
    used = _refuse_boto3(store, monkeypatch)
    meta = {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"}

    async def run() -> str | None:
        with trio.fail_after(20):
            try:
                return await store.put_bytes("d/file.txt", b"x" * 65536, meta, "text/plain")
            finally:
                await store.aclose()

    etag = trio.run(run)
    assert used == []
    head = rclone_server.client().head_object(Bucket=bucket, Key="d/file.txt")
    assert head["ContentLength"] == 65536
    # rclone answers with canonical header case whichever client wrote them.
    assert {k.lower(): v for k, v in head["Metadata"].items()} == meta
    assert head["ContentType"] == "text/plain"
    assert etag and etag == head["ETag"].strip('"')


def test_large_or_refused_puts_use_boto3(
    rclone_server: S3Server, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = store.bucket
    assert store.fast_client is not None
    monkeypatch.setattr(store.fast_client, "enabled", False)

    async def run() -> None:
        with trio.fail_after(20):
            await store.put_bytes("refused", b"abc", {"mode": "33188"})
            await store.put_bytes("big", b"y" * (FAST_PUT_MAX + 1), {})

    trio.run(run)
    s3 = rclone_server.client()
    assert s3.get_object(Bucket=bucket, Key="refused")["Body"].read() == b"abc"
    assert s3.head_object(Bucket=bucket, Key="big")["ContentLength"] == FAST_PUT_MAX + 1
