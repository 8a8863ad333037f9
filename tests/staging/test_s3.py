"""Copies to and from S3 on loopback servers: round trips, verification, skipping, resume."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server, build_tree, leftovers, snapshot, start_rclone, write_random

from plugin.s3.boto3store import Boto3Store
from plugin.s3.settings import S3Settings
from plugin.s3.store import ObjectInfo, Sink
from plugin.staging import CopyOptions, S3Options, copy
from plugin.staging.engine import temp_paths

pytestmark = pytest.mark.s3

MiB = 1 << 20


def needs_client(client: str) -> None:
    if client == "crt":
        pytest.importorskip("awscrt", reason="the CRT byte path needs awscrt (pip install awscrt)")


def _opts(**kw: Any) -> CopyOptions:
    base: dict[str, Any] = {"chunk_size": MiB, "jobs": 4, "retries": 2, "retry_delay": 0.05}
    base.update(kw)
    return CopyOptions(**base)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def test_tree_round_trip_moto(moto_s3: S3Server, bucket_name: str, tmp_path: Path) -> None:
    """Everything survives local -> S3 -> local on a server with full S3 semantics."""
    bucket = moto_s3.make_bucket(bucket_name)
    src, back = tmp_path / "src", tmp_path / "back"
    build_tree(src, big_size=7 * MiB)  # multipart upload: 5 MiB + 2 MiB parts
    s3 = S3Options(endpoint_url=moto_s3.endpoint)
    up = copy(str(src), f"s3://{bucket}/vol", _opts(), s3=s3)
    assert up.ok, up.errors
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert "vol/empty-dir/" in keys and "vol/nested-empty/inner/" in keys
    assert "vol/nested-empty/" not in keys  # non-empty directories need no marker
    head = moto_s3.client().head_object(Bucket=bucket, Key="vol/big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # really went up as a multipart upload
    down = copy(f"s3://{bucket}/vol", str(back), _opts(), s3=s3)
    assert down.ok, down.errors
    # S3 keeps no metadata for non-empty directories: compare those by existence only.
    assert snapshot(back, dirs_meta=False) == snapshot(src, dirs_meta=False)
    assert leftovers(back) == []
    # Both directions again: nothing moves.
    assert copy(str(src), f"s3://{bucket}/vol", _opts(), s3=s3).bytes_copied == 0
    again = copy(f"s3://{bucket}/vol", str(back), _opts(), s3=s3)
    assert again.ok and again.bytes_copied == 0 and again.files_copied == 0


@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_large_round_trip_rclone(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, client: str
) -> None:
    """Chunked ranged GETs and multipart upload on a range-efficient server, on both byte
    paths."""
    needs_client(client)
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 23 * MiB + 123, seed=3)
    for i in range(50):
        (src / f"small-{i:03d}.txt").write_text(f"file {i}\n" * i)
    s3 = S3Options(endpoint_url=rclone_s3.endpoint, client=client)
    up = copy(str(src), f"s3://{bucket}/data/", _opts(chunk_size=5 * MiB), s3=s3)
    assert up.ok, up.errors
    down = copy(f"s3://{bucket}/data", str(tmp_path / "back"), _opts(chunk_size=2 * MiB), s3=s3)
    assert down.ok, down.errors
    assert snapshot(tmp_path / "back", dirs_meta=False) == snapshot(src, dirs_meta=False)
    # Single object to an explicit file name, and into a directory.
    one = copy(f"s3://{bucket}/data/big.bin", str(tmp_path / "one.bin"), _opts(), s3=s3)
    assert one.ok and _sha(tmp_path / "one.bin") == _sha(src / "big.bin")
    (tmp_path / "into").mkdir()
    into = copy(f"s3://{bucket}/data/small-007.txt", str(tmp_path / "into"), _opts(), s3=s3)
    assert into.ok and (tmp_path / "into" / "small-007.txt").read_text() == "file 7\n" * 7


class _CorruptingStore(Boto3Store):
    """Flips one byte of every GET body: verification must catch it."""

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        def bad_sink(offset: int, data: memoryview) -> None:
            b = bytearray(data)
            if b:
                b[0] ^= 0xFF
            sink(offset, memoryview(b))

        return super().get(bucket, key, bad_sink, start, length)


def test_corruption_is_detected_and_never_renamed(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    rclone_s3.put_random(bucket, "big.bin", 3 * MiB, tmp_path, seed=5)
    rclone_s3.client().put_object(Bucket=bucket, Key="small.txt", Body=b"small")
    store = _CorruptingStore(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    result = copy(f"s3://{bucket}", str(tmp_path / "dst"), _opts(), store=store)
    assert result.state == "failed" and result.files_failed == 2
    assert all("does not match" in e.message for e in result.errors), result.errors
    assert not (tmp_path / "dst" / "big.bin").exists()
    assert not (tmp_path / "dst" / "small.txt").exists()
    # A corrupt part file is not kept for resuming.
    assert leftovers(tmp_path / "dst") == []


def test_cli_round_trip(rclone_s3: S3Server, bucket_name: str, tmp_path: Path) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "a.bin", 2 * MiB + 1)
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_text("b")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    base = [sys.executable, "-m", "plugin.staging.cli", "cp", "--endpoint", rclone_s3.endpoint]
    up = subprocess.run(
        [*base, str(src), f"s3://{bucket}/p", "--chunk-size", "5M"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert up.returncode == 0, up.stderr
    down = subprocess.run(
        [*base, f"s3://{bucket}/p", str(tmp_path / "back"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert down.returncode == 0, down.stderr
    assert snapshot(tmp_path / "back", dirs_meta=False) == snapshot(src, dirs_meta=False)
    missing = subprocess.run(
        [*base, f"s3://{bucket}/nothing-here/", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert missing.returncode == 2 and "no objects under" in missing.stderr


def _journal_records(journal: str) -> int:
    try:
        with open(journal) as fh:
            return sum(1 for line in fh.read().split("\n")[1:-1] if line.isdigit())
    except FileNotFoundError:
        return 0


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "plugin.staging.cli", "cp", "--endpoint", endpoint, *args]


@pytest.mark.slow
def test_kill9_download_resumes(rclone_s3: S3Server, bucket_name: str, tmp_path: Path) -> None:
    """kill -9 in the middle of a chunked download; the rerun reuses the finished chunks."""
    bucket = rclone_s3.make_bucket(bucket_name)
    obj = rclone_s3.put_random(bucket, "big.bin", 160 * MiB, tmp_path, seed=11)
    dst = tmp_path / "big.bin"
    part, journal = temp_paths(str(dst))
    proc = subprocess.Popen(
        _cli(
            rclone_s3.endpoint,
            f"s3://{bucket}/big.bin",
            str(dst),
            "--chunk-size",
            "1M",
            "--bwlimit",
            "40M",
            "-j",
            "4",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: _journal_records(journal) >= 30, 60, "30 chunks in the journal")
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -9
    done_before = _journal_records(journal)
    assert 30 <= done_before < 160
    assert not dst.exists() and os.path.exists(part)
    result = copy(
        f"s3://{bucket}/big.bin",
        str(dst),
        _opts(),
        s3=S3Options(endpoint_url=rclone_s3.endpoint),
    )
    assert result.ok, result.errors
    assert result.bytes_resumed >= done_before * MiB
    assert result.bytes_copied <= 160 * MiB - done_before * MiB
    assert _sha(dst) == _sha(obj)
    assert not os.path.exists(part) and not os.path.exists(journal)


@pytest.mark.slow
def test_kill9_upload_resumes_from_listed_parts(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """kill -9 in the middle of a multipart upload; the rerun reuses parts found by ListParts."""
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "up.bin"
    write_random(src, 100 * MiB, seed=12)
    client = rclone_s3.client()

    def uploads_() -> list[dict[str, Any]]:
        try:
            return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
        except client.exceptions.NoSuchUpload:  # rclone's way of saying "none"
            return []

    def parts_done() -> int:
        uploads = uploads_()
        if not uploads:
            return 0
        up = uploads[0]
        return len(
            client.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]).get(
                "Parts", []
            )
        )

    proc = subprocess.Popen(
        _cli(
            rclone_s3.endpoint,
            str(src),
            f"s3://{bucket}/up.bin",
            "--chunk-size",
            "5M",
            "--bwlimit",
            "25M",
            "-j",
            "2",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: parts_done() >= 4, 60, "4 uploaded parts")
    finally:
        proc.kill()
        proc.wait(10)
    done_before = parts_done()
    assert 4 <= done_before < 20
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # nothing visible yet
    result = copy(
        str(src), f"s3://{bucket}/up.bin", _opts(), s3=S3Options(endpoint_url=rclone_s3.endpoint)
    )
    assert result.ok, result.errors
    assert result.bytes_resumed >= done_before * 5 * MiB
    assert result.bytes_copied <= 100 * MiB - done_before * 5 * MiB
    back = tmp_path / "back.bin"
    assert copy(
        f"s3://{bucket}/up.bin", str(back), _opts(), s3=S3Options(endpoint_url=rclone_s3.endpoint)
    ).ok
    assert _sha(back) == _sha(src)
    assert uploads_() == []


@pytest.mark.slow
@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_server_stopped_mid_transfer_fails_clearly_then_resumes(
    tmp_path: Path, bucket_name: str, client: str
) -> None:
    """The S3 server dies mid-download: retries, a clear error, no partial file under the
    final name, and once the server is back a rerun finishes from the kept chunks."""
    needs_client(client)
    data = tmp_path / "s3data"
    server = start_rclone(data, tmp_path / "rclone.log")
    try:
        bucket = server.make_bucket(bucket_name)
        obj = server.put_random(bucket, "big.bin", 48 * MiB, tmp_path, seed=13)
        for i in range(20):
            server.client().put_object(Bucket=bucket, Key=f"s{i}.txt", Body=str(i).encode())
        dst = tmp_path / "dst"
        part, journal = temp_paths(str(dst / "big.bin"))
        holder: dict[str, Any] = {}
        s3 = S3Options(endpoint_url=server.endpoint, client=client)

        def run() -> None:
            holder["result"] = copy(
                f"s3://{bucket}", str(dst), _opts(bwlimit=16 * MiB, jobs=2), s3=s3
            )

        t = threading.Thread(target=run)
        t.start()
        _wait(lambda: _journal_records(journal) >= 8, 30, "8 chunks downloaded")
        server.kill()
        t.join(60)
        assert not t.is_alive()
        result = holder["result"]
        assert result.state == "failed" and not result.ok
        messages = " | ".join(e.message for e in result.errors)
        assert "cannot reach the S3 endpoint" in messages, messages
        assert "after 3 attempts" in messages, messages
        assert not (dst / "big.bin").exists()
        assert os.path.exists(part)
        # Server back on the same port: the rerun completes from where it stopped.
        server = start_rclone(data, tmp_path / "rclone.log", port=server.port)
        again = copy(f"s3://{bucket}", str(dst), _opts(), s3=s3)
        assert again.ok, again.errors
        assert again.bytes_resumed >= 8 * MiB
        assert _sha(dst / "big.bin") == _sha(obj)
        assert leftovers(dst) == []
    finally:
        server.stop()


def test_unchanged_objects_are_skipped_by_etag_and_mtime(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 12 * MiB)
    (src / "a.txt").write_text("a")
    s3 = S3Options(endpoint_url=rclone_s3.endpoint)
    assert copy(str(src), f"s3://{bucket}/x", _opts(chunk_size=5 * MiB), s3=s3).ok
    again = copy(str(src), f"s3://{bucket}/x", _opts(chunk_size=5 * MiB), s3=s3)
    assert again.files_skipped == 2 and again.bytes_copied == 0
    os.utime(src / "big.bin", ns=(1, 1))  # same size, other mtime: must go again
    third = copy(str(src), f"s3://{bucket}/x", _opts(chunk_size=5 * MiB), s3=s3)
    assert third.files_copied == 1 and third.bytes_copied == 12 * MiB
    meta: Mapping[str, str] = rclone_s3.client().head_object(Bucket=bucket, Key="x/big.bin")[
        "Metadata"
    ]
    assert {k.lower(): v for k, v in meta.items()}["mtime"] == "0.000000001"


class _FlakyStore(Boto3Store):
    """Breaks every other GET halfway through its body, like a connection reset mid-stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.ranges: list[tuple[int, int | None]] = []

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        self.calls += 1
        self.ranges.append((start, length))
        if self.calls % 2:
            delivered = [0]

            def half_sink(offset: int, data: memoryview) -> None:
                if delivered[0] >= 300_000:
                    raise ConnectionResetError(104, "connection reset by peer (injected)")
                delivered[0] += len(data)
                sink(offset, data)

            return super().get(bucket, key, half_sink, start, length)
        return super().get(bucket, key, sink, start, length)


def test_broken_streams_are_retried_from_where_they_stopped(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    obj = rclone_s3.put_random(bucket, "big.bin", 4 * MiB, tmp_path, seed=21)
    store = _FlakyStore(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    result = copy(f"s3://{bucket}/big.bin", str(tmp_path / "out.bin"), _opts(jobs=1), store=store)
    assert result.ok, result.errors
    assert _sha(tmp_path / "out.bin") == _sha(obj)
    # Every retry asked only for the rest of its chunk, so nothing was fetched twice.
    assert result.bytes_copied == 4 * MiB
    retried = [(s, n) for s, n in store.ranges if s % MiB]
    assert retried and all(n is not None and (s % MiB) + n == MiB for s, n in retried)


class _FirstChunkFailsStore(Boto3Store):
    """Every GET of the object's first bytes fails: the in-order hash can never start."""

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        if start == 0:
            raise ConnectionResetError(104, "connection reset by peer (injected)")
        return super().get(bucket, key, sink, start, length)


def test_chunks_waiting_for_the_hash_give_up_when_a_chunk_fails(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """Downloads run at most 2 x jobs chunks ahead of the plain-MD5 hash. When the first
    chunk fails for good, the chunks waiting on the hash must end too: a clear failure, not
    a hang, and a rerun finishes the file from the chunks that did land."""
    bucket = rclone_s3.make_bucket(bucket_name)
    obj = rclone_s3.put_random(bucket, "big.bin", 12 * MiB + 3, tmp_path, seed=23)
    dst = tmp_path / "d" / "big.bin"
    store = _FirstChunkFailsStore(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    opts = _opts(jobs=2)  # lead 4 of 13 chunks: most of them wait
    box: list[Any] = []
    runner = threading.Thread(
        target=lambda: box.append(copy(f"s3://{bucket}/big.bin", str(dst), opts, store=store)),
        daemon=True,
    )
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the copy hung on chunks waiting for the hash"
    failed = box[0]
    assert failed.state == "failed" and "connection reset" in failed.errors[0].message
    assert not dst.exists()
    healthy = Boto3Store(S3Settings(endpoint_url=rclone_s3.endpoint))
    again = copy(f"s3://{bucket}/big.bin", str(dst), opts, store=healthy)
    assert again.ok, again.errors
    assert 0 < again.bytes_copied < obj.stat().st_size  # resumed, not started over
    assert _sha(dst) == _sha(obj)


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


def _multipart_put(server: S3Server, bucket: str, key: str, path: Path, part: int) -> str:
    """Upload *path* as a multipart upload with *part*-byte parts; returns the ETag."""
    c = server.client()
    uid = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    with open(path, "rb") as fh:
        n = 1
        while block := fh.read(part):
            etag = c.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, Body=block)
            parts.append({"PartNumber": n, "ETag": etag["ETag"]})
            n += 1
    done = c.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
    )
    return str(done["ETag"]).strip('"')


def test_multipart_etag_verified_per_part_and_corruption_caught(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """A multipart ETag is rebuilt from per-part MD5s (parts of 5 MiB, chunks of 2 MiB: not
    aligned), and one flipped byte in one chunk fails the file without renaming it."""
    bucket = moto_s3.make_bucket(bucket_name)
    src = tmp_path / "obj.bin"
    write_random(src, 12 * MiB + 77, seed=8)
    etag = _multipart_put(moto_s3, bucket, "mp.bin", src, 5 * MiB)
    assert etag.endswith("-3")
    s3 = S3Options(endpoint_url=moto_s3.endpoint, client="boto3")
    good = copy(
        f"s3://{bucket}/mp.bin", str(tmp_path / "good.bin"), _opts(chunk_size=2 * MiB), s3=s3
    )
    assert good.ok, good.errors
    assert _sha(tmp_path / "good.bin") == _sha(src)
    store = _CorruptOneChunkStore(7 * MiB + 5, settings=S3Settings(endpoint_url=moto_s3.endpoint))
    bad = copy(
        f"s3://{bucket}/mp.bin",
        str(tmp_path / "bad" / "x.bin"),
        _opts(chunk_size=2 * MiB),
        store=store,
    )
    assert bad.state == "failed" and "does not match" in bad.errors[0].message, bad.errors
    assert not (tmp_path / "bad" / "x.bin").exists()
    assert leftovers(tmp_path / "bad") == []


def test_plain_etag_one_bad_chunk_mid_file_is_caught(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """Overlapped streaming MD5: a single corrupted chunk in the middle is still caught."""
    bucket = rclone_s3.make_bucket(bucket_name)
    rclone_s3.put_random(bucket, "big.bin", 6 * MiB + 3, tmp_path, seed=9)
    store = _CorruptOneChunkStore(
        3 * MiB + 17, settings=S3Settings(endpoint_url=rclone_s3.endpoint)
    )
    res = copy(f"s3://{bucket}/big.bin", str(tmp_path / "d" / "big.bin"), _opts(), store=store)
    assert res.state == "failed" and "does not match" in res.errors[0].message, res.errors
    assert not (tmp_path / "d" / "big.bin").exists()
    assert leftovers(tmp_path / "d") == []


class _CompleteAnswersStore(Boto3Store):
    """Completes for real, then reports *etag* (if given) instead of the server's ETag, and
    *size* (if given) at HEAD: what a broken server would say. Counts HEADs after a
    completion."""

    def __init__(self, etag: str | None = None, size: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.answer_etag = etag
        self.answer_size = size
        self.completed = False
        self.heads_after_complete = 0

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str:
        etag = super().complete_multipart(bucket, key, upload_id, parts)
        self.completed = True
        return etag if self.answer_etag is None else self.answer_etag

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        info = super().head(bucket, key)
        if self.completed:
            self.heads_after_complete += 1
            if info is not None and self.answer_size is not None:
                info = ObjectInfo(key=key, size=self.answer_size, etag=info.etag)
        return info


@pytest.mark.parametrize(
    ("etag", "size", "error"),
    [
        ('"' + "0" * 32 + '-3"', None, "multipart ETag"),  # not our parts
        ('"opaque"', 1, "stored object has 1 bytes"),  # no checkable ETag: size decides
    ],
)
def test_completed_upload_is_checked_against_its_parts(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, etag: str, size: int, error: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    write_random(tmp_path / "big.bin", 12 * MiB + 5, seed=9)
    store = _CompleteAnswersStore(etag, size, settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    dst = f"s3://{bucket}/big.bin"
    bad = copy(str(tmp_path / "big.bin"), dst, _opts(chunk_size=5 * MiB), store=store)
    assert bad.state == "failed" and error in bad.errors[0].message, bad.errors


def test_matching_multipart_etag_needs_no_head(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """`rclone serve s3` answers a HEAD right after a multipart upload by hashing the whole
    object; a completion ETag built from our own part MD5s already proves the content."""
    bucket = rclone_s3.make_bucket(bucket_name)
    src = tmp_path / "big.bin"
    write_random(src, 12 * MiB + 5, seed=10)
    store = _CompleteAnswersStore(settings=S3Settings(endpoint_url=rclone_s3.endpoint))
    up = copy(str(src), f"s3://{bucket}/big.bin", _opts(chunk_size=5 * MiB), store=store)
    assert up.ok and store.completed, up.errors
    assert store.heads_after_complete == 0
    body = rclone_s3.client().get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == _sha(src)
    # Without verification the acknowledged parts are trusted: still no HEAD.
    store.completed = False
    nover = copy(
        str(src),
        f"s3://{bucket}/again/big.bin",
        _opts(chunk_size=5 * MiB, verify=False),
        store=store,
    )
    assert nover.ok and store.completed, nover.errors
    assert store.heads_after_complete == 0
    again = rclone_s3.client().head_object(Bucket=bucket, Key="again/big.bin")
    assert again["ContentLength"] == src.stat().st_size
