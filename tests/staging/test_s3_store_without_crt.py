"""awscrt is optional (issue 13): without it the copy engine's fast store keeps the
hand-signed path for small objects, ranges and multipart parts, and asks boto3 for HEAD,
LIST and whatever the fast path cannot take. A tree with small files and a multipart file
goes up and comes back byte for byte, with the s3fs metadata s3fs-fuse writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from harness.s3servers import S3Server

from plugin.s3.crtstore import CrtStore
from plugin.s3.settings import S3Settings
from plugin.staging import CopyOptions, copy

pytestmark = pytest.mark.s3


def test_round_trip_without_the_crt(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import plugin.s3.crtstore as crtstore

    monkeypatch.setattr(crtstore, "_crt_available", lambda: False)
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        (src / "sub" / f"f{i}.bin").write_bytes(os.urandom(i * 1000))
    (src / "big.bin").write_bytes(os.urandom(11 << 20))  # three 4 MiB parts
    os.utime(src / "sub" / "f3.bin", ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    opts: dict[str, Any] = {"chunk_size": 4 << 20, "jobs": 3, "retries": 1, "retry_delay": 0.05}
    store = CrtStore(S3Settings(endpoint_url=rclone_s3.endpoint))
    try:
        assert store._crt is None
        up = copy(str(src), f"s3://{bucket}/t", CopyOptions(**opts), store=store)
        assert up.ok, up.errors
        down = copy(f"s3://{bucket}/t", str(tmp_path / "dst"), CopyOptions(**opts), store=store)
        assert down.ok, down.errors
    finally:
        store.close()
    for f in src.rglob("*.bin"):
        assert (tmp_path / "dst" / f.relative_to(src)).read_bytes() == f.read_bytes()
    head = rclone_s3.client().head_object(Bucket=bucket, Key="t/sub/f3.bin")
    meta = {k.lower(): v for k, v in head["Metadata"].items()}  # rclone says "Mtime"
    assert meta["mtime"] == "1700000000"  # as s3fs-fuse writes whole seconds
