"""Verified downloads with the store's own CRC (issue 14): CRC64NVME / CRC32C / CRC32 asked
for with `x-amz-checksum-mode: ENABLED`, computed per chunk by the workers and combined; MD5
(the ETag) only when no CRC is offered. Against moto's server, which keeps and returns them."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server, leftovers, write_random

from plugin.s3.boto3store import Boto3Store
from plugin.s3.settings import S3Settings
from plugin.s3.store import Checksum, ObjectInfo, Sink
from plugin.staging import CopyOptions, copy
from plugin.staging import crc as crcmod
from plugin.staging.engine import temp_paths
from plugin.staging.progress import CopyResult, Progress

pytestmark = pytest.mark.s3

MiB = 1 << 20
CHUNK = MiB
#: Chunked (several 1 MiB chunks, last one short) and small (one GET) objects.
BIG = 3 * MiB + 777
SMALL = 100 * 1024 + 3


def _opts(**kw: Any) -> CopyOptions:
    base: dict[str, Any] = {"chunk_size": CHUNK, "jobs": 4, "retries": 1, "retry_delay": 0.05}
    base.update(kw)
    return CopyOptions(**base)


def _put(server: S3Server, bucket: str, key: str, data: bytes, algorithm: str | None) -> None:
    kw = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    server.client().put_object(Bucket=bucket, Key=key, Body=data, **kw)


def _put_multipart(
    server: S3Server,
    bucket: str,
    key: str,
    data: bytes,
    part: int,
    algorithm: str | None,
    kind: str | None = None,
) -> None:
    c = server.client()
    kw: dict[str, Any] = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    if kind:
        kw["ChecksumType"] = kind
    uid = c.create_multipart_upload(Bucket=bucket, Key=key, **kw)["UploadId"]
    parts = []
    for n, off in enumerate(range(0, len(data), part), 1):
        extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
        r = c.upload_part(
            Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, Body=data[off : off + part], **extra
        )
        entry = {"PartNumber": n, "ETag": r["ETag"]}
        entry.update({k: v for k, v in r.items() if k.startswith("Checksum")})
        parts.append(entry)
    c.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
    )


def _data(size: int, seed: int) -> bytes:
    return random_bytes(size, seed)


def random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def _store(server: S3Server, client: str) -> Any:
    if client == "crt":
        pytest.importorskip("awscrt")
        from plugin.s3.crtstore import CrtStore

        return CrtStore(S3Settings(endpoint_url=server.endpoint))
    return Boto3Store(S3Settings(endpoint_url=server.endpoint))


class _CorruptOneChunkStore(Boto3Store):
    """Flips one byte in the GET that covers *offset* only: a single bad chunk mid-file."""

    def __init__(self, offset: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.offset = offset

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        def bad_sink(offset: int, data: memoryview) -> None:
            if offset <= self.offset < offset + len(data):
                b = bytearray(data)
                b[self.offset - offset] ^= 0x01
                data = memoryview(b)
            sink(offset, data)

        return super().get(bucket, key, bad_sink, start, length)


# ------------------------------------------------------------------ the check made


@pytest.mark.parametrize("client", ["boto3", "crt"])
@pytest.mark.parametrize(
    ("algorithm", "check"),
    [("CRC64NVME", "crc64nvme"), ("CRC32C", "crc32c"), ("CRC32", "crc32"), (None, "md5")],
)
def test_download_verified_with_the_stores_checksum(
    moto_s3: S3Server,
    bucket_name: str,
    tmp_path: Path,
    client: str,
    algorithm: str | None,
    check: str,
) -> None:
    """A chunked and a single-GET object, each verified by the check the store offers
    (HEAD / GET asked with x-amz-checksum-mode), and that check reported."""
    bucket = moto_s3.make_bucket(bucket_name)
    big, small = _data(BIG, 1), _data(SMALL, 2)
    _put(moto_s3, bucket, "d/big.bin", big, algorithm)
    _put(moto_s3, bucket, "d/small.bin", small, algorithm)
    store = _store(moto_s3, client)
    progress: list[Progress] = []
    try:
        res = copy(
            f"s3://{bucket}/d",
            str(tmp_path / "out"),
            _opts(progress=progress.append),
            store=store,
        )
    finally:
        store.close()
    assert res.ok, res.errors
    assert (tmp_path / "out" / "big.bin").read_bytes() == big
    assert (tmp_path / "out" / "small.bin").read_bytes() == small
    assert res.checks == {check: 2}
    assert progress[-1].checks == {check: 2}


def test_unverified_download_reports_size_only(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    _put(moto_s3, bucket, "d/big.bin", _data(BIG, 3), "CRC64NVME")
    res = copy(
        f"s3://{bucket}/d",
        str(tmp_path / "out"),
        _opts(verify=False),
        store=Boto3Store(S3Settings(endpoint_url=moto_s3.endpoint)),
    )
    assert res.ok and res.checks == {"size-only": 1}


# ------------------------------------------------------------------ corruption caught


@pytest.mark.parametrize(
    ("algorithm", "name"), [("CRC64NVME", "crc64nvme"), ("CRC32C", "crc32c"), (None, "MD5")]
)
def test_one_bad_byte_is_caught_and_not_renamed(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path, algorithm: str | None, name: str
) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    _put(moto_s3, bucket, "big.bin", _data(BIG, 4), algorithm)
    _put(moto_s3, bucket, "small.bin", _data(SMALL, 5), algorithm)
    for key, offset in (("big.bin", 2 * MiB + 17), ("small.bin", 1000)):
        dst = tmp_path / "d" / key
        store = _CorruptOneChunkStore(offset, settings=S3Settings(endpoint_url=moto_s3.endpoint))
        res = copy(f"s3://{bucket}/{key}", str(dst), _opts(), store=store)
        assert res.state == "failed", (key, res.errors)
        message = res.errors[0].message
        assert "does not match" in message and name in message, (key, message)
        assert not dst.exists()
        assert leftovers(tmp_path / "d") == []


# ------------------------------------------------------------------ multipart objects


@pytest.mark.parametrize(
    ("algorithm", "kind", "check"),
    [
        ("CRC64NVME", None, "crc64nvme"),  # always a full-object CRC
        # (moto 5.2's FULL_OBJECT CRC32C of a multipart upload is really a CRC32, which the
        # engine rightly refuses; its FULL_OBJECT CRC32 is right.)
        ("CRC32", "FULL_OBJECT", "crc32"),
        # moto keeps a composite value without saying so (no "-N", no type): not trusted,
        # the multipart ETag is checked instead, and a good copy is not refused.
        ("CRC32C", None, "md5"),
        (None, None, "md5"),
    ],
)
def test_multipart_objects(
    moto_s3: S3Server,
    bucket_name: str,
    tmp_path: Path,
    algorithm: str | None,
    kind: str | None,
    check: str,
) -> None:
    """Parts of 5 MiB, chunks of 2 MiB: part boundaries fall inside chunks."""
    bucket = moto_s3.make_bucket(bucket_name)
    data = _data(12 * MiB + 5, 6)
    _put_multipart(moto_s3, bucket, "mp.bin", data, 5 * MiB, algorithm, kind)
    dst = tmp_path / "out" / "mp.bin"
    store = Boto3Store(S3Settings(endpoint_url=moto_s3.endpoint))
    res = copy(f"s3://{bucket}/mp.bin", str(dst), _opts(chunk_size=2 * MiB), store=store)
    assert res.ok, res.errors
    assert dst.read_bytes() == data
    assert res.checks == {check: 1}
    if check != "md5":
        bad = _CorruptOneChunkStore(7 * MiB + 5, settings=S3Settings(endpoint_url=moto_s3.endpoint))
        res = copy(
            f"s3://{bucket}/mp.bin", str(tmp_path / "bad.bin"), _opts(chunk_size=2 * MiB), store=bad
        )
        assert res.state == "failed" and "does not match" in res.errors[0].message
        assert not (tmp_path / "bad.bin").exists()


def _composite(data: bytes, part: int, algorithm: str) -> str:
    """S3's COMPOSITE checksum, computed independently: CRC of the part CRCs, "-N"."""
    fn = crcmod.compute_fn(algorithm)
    assert fn is not None
    width = crcmod.width_bytes(algorithm)
    crcs = [fn(data[o : o + part], 0).to_bytes(width, "big") for o in range(0, len(data), part)]
    return base64.b64encode(fn(b"".join(crcs), 0).to_bytes(width, "big")).decode() + (
        f"-{len(crcs)}"
    )


class _CompositeStore(Boto3Store):
    """Answers HEAD with the composite CRC32C AWS keeps for a default multipart upload (moto
    keeps an unusable value): what the engine must rebuild from per-chunk CRCs."""

    def __init__(self, value: str, corrupt_at: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.value = value
        self.corrupt_at = corrupt_at

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        info = super().head(bucket, key)
        if info is None:
            return None
        return replace(info, checksum=Checksum("crc32c", self.value, "COMPOSITE"))

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        at = self.corrupt_at

        def bad_sink(offset: int, data: memoryview) -> None:
            if at is not None and offset <= at < offset + len(data):
                b = bytearray(data)
                b[at - offset] ^= 0x80
                data = memoryview(b)
            sink(offset, data)

        return super().get(bucket, key, bad_sink, start, length)


def test_composite_multipart_crc(moto_s3: S3Server, bucket_name: str, tmp_path: Path) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    data = _data(12 * MiB + 5, 7)
    _put_multipart(moto_s3, bucket, "mp.bin", data, 5 * MiB, "CRC32C")
    value = _composite(data, 5 * MiB, "crc32c")
    assert value.endswith("-3")
    good = _CompositeStore(value, settings=S3Settings(endpoint_url=moto_s3.endpoint))
    res = copy(
        f"s3://{bucket}/mp.bin", str(tmp_path / "ok.bin"), _opts(chunk_size=2 * MiB), store=good
    )
    assert res.ok, res.errors
    assert res.checks == {"crc32c": 1}
    assert (tmp_path / "ok.bin").read_bytes() == data
    bad = _CompositeStore(
        value, corrupt_at=11 * MiB, settings=S3Settings(endpoint_url=moto_s3.endpoint)
    )
    res = copy(
        f"s3://{bucket}/mp.bin", str(tmp_path / "bad.bin"), _opts(chunk_size=2 * MiB), store=bad
    )
    assert res.state == "failed" and "does not match" in res.errors[0].message
    assert not (tmp_path / "bad.bin").exists()


# ------------------------------------------------------------------ resume


class _FailFromStore(Boto3Store):
    """Ranged GETs at or past *offset* fail for good: an interrupted run."""

    def __init__(self, offset: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.offset = offset

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        if start >= self.offset:
            raise PermissionError("interrupted (test)")
        return super().get(bucket, key, sink, start, length)

    def is_transient(self, exc: BaseException) -> bool:
        return False if isinstance(exc, PermissionError) else super().is_transient(exc)


@pytest.mark.parametrize("tamper", [False, True])
def test_resumed_download_still_verifies(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path, tamper: bool
) -> None:
    """Chunks an interrupted run wrote are checked too (their CRCs are read back from the
    part file): a good resume reports crc64nvme; a chunk damaged on disk between the runs
    is caught."""
    bucket = moto_s3.make_bucket(bucket_name)
    data = _data(6 * MiB + 11, 8)
    _put(moto_s3, bucket, "big.bin", data, "CRC64NVME")
    dst = tmp_path / "out" / "big.bin"
    first = copy(
        f"s3://{bucket}/big.bin",
        str(dst),
        _opts(jobs=1),
        store=_FailFromStore(3 * MiB, settings=S3Settings(endpoint_url=moto_s3.endpoint)),
    )
    assert first.state == "failed" and not dst.exists()
    part, journal = temp_paths(str(dst))
    assert os.path.exists(part) and os.path.exists(journal)
    if tamper:
        with open(part, "r+b") as fh:  # chunk 1, recorded as done in the journal
            fh.seek(MiB + 5)
            byte = fh.read(1)
            fh.seek(MiB + 5)
            fh.write(bytes([byte[0] ^ 0x10]))
    store = Boto3Store(S3Settings(endpoint_url=moto_s3.endpoint))
    res = copy(f"s3://{bucket}/big.bin", str(dst), _opts(), store=store)
    assert res.bytes_resumed >= 2 * MiB
    if tamper:
        assert res.state == "failed" and "does not match" in res.errors[0].message
        assert not dst.exists() and leftovers(tmp_path / "out") == []
    else:
        assert res.ok, res.errors
        assert res.checks == {"crc64nvme": 1}
        assert dst.read_bytes() == data


# ------------------------------------------------------------------ reporting, CRC math


def test_cli_verbose_reports_the_check(moto_s3: S3Server, bucket_name: str, tmp_path: Path) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    src = tmp_path / "f.bin"
    write_random(src, 2 * MiB + 1)
    _put(moto_s3, bucket, "f.bin", src.read_bytes(), "CRC64NVME")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    base = [sys.executable, "-m", "plugin.staging.cli", "cp", "--endpoint", moto_s3.endpoint]
    out = subprocess.run(
        [*base, "-v", "--no-progress", f"s3://{bucket}/f.bin", str(tmp_path / "back.bin")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "checks: crc64nvme 1" in out.stderr


def test_status_of_a_staged_volume_shows_the_checks() -> None:
    from plugin.backends.staged.state import JobState

    job = JobState()
    job.finish(CopyResult(checks={"crc64nvme": 2, "md5": 1}))
    assert asdict(job)["checks"] == {"crc64nvme": 2, "md5": 1}


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c", "crc64nvme"])
def test_python_crc_combine_matches_awscrt(algorithm: str) -> None:
    """The fallback combine (for an awscrt without combine_*) is the standard math."""
    fn = crcmod.compute_fn(algorithm)
    assert fn is not None
    a, b = os.urandom(1000), os.urandom(70_001)
    whole = fn(a + b, 0)
    assert crcmod.combine_py(algorithm, fn(a, 0), fn(b, 0), len(b)) == whole
    assert crcmod.combine(algorithm, fn(a, 0), fn(b, 0), len(b)) == whole
