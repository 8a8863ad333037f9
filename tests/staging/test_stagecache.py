"""The host-wide stage-in cache (plugin/staging/stagecache.py): what it serves, what it drops,
what a crash leaves, and that a reflink really shares extents on a filesystem that has them."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.loopfs import loop_mounted, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stagingkit import S3Server

from plugin.staging import stagecache
from plugin.staging.engine import CopyOptions, S3Options, copy, make_store
from plugin.staging.objcache import ObjectIdentity
from plugin.staging.progress import CopyResult
from plugin.staging.stagecache import (
    MIN_CACHE_BYTES,
    TEMP_PREFIX,
    StageCache,
    StageCacheError,
    entry_name,
    parse_stage_cache,
)

MiB = 1 << 20


def ident(key: str = "models/a.bin", etag: str = "e1", size: int = MiB) -> ObjectIdentity:
    return ObjectIdentity("http://127.0.0.1:9000", "bucket", key, etag, size)


def make_source(path: Path, size: int, seed: int = 1) -> Path:
    block = bytes((seed + i) % 251 for i in range(4096))
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path


def admit_file(cache: StageCache, obj: ObjectIdentity, path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        cache.admit(obj, fd)
    finally:
        os.close(fd)


def fill_file(cache: StageCache, obj: ObjectIdentity, path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return cache.fill(obj, fd)
    finally:
        os.close(fd)


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[StageCache]:
    c = StageCache(tmp_path / "cache", 8 * MiB)
    yield c
    c.close()


def test_fill_after_admit_gives_the_same_bytes(cache: StageCache, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", MiB + 123)
    obj = ident(size=MiB + 123)
    assert not fill_file(cache, obj, tmp_path / "before")
    assert (tmp_path / "before").stat().st_size == 0
    admit_file(cache, obj, src)
    assert fill_file(cache, obj, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1
    assert stats["bytes_served"] == MiB + 123 and stats["bytes_admitted"] == MiB + 123
    assert stats["entries"] == 1 and stats["bytes_cached"] == MiB + 123


def test_directory_0700_and_entries_0600(cache: StageCache, tmp_path: Path) -> None:
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
    admit_file(cache, ident(), make_source(tmp_path / "src", MiB))
    (name,) = entries(cache.directory)
    entry = cache.directory / name
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert entry.stat().st_uid == os.geteuid()


def test_loose_directory_mode_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir(mode=0o755)
    os.chmod(tmp_path / "c", 0o777)
    StageCache(tmp_path / "c", 4 * MiB).close()
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700


def test_directory_of_another_owner_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    (tmp_path / "c").mkdir()
    os.chown(tmp_path / "c", 65534, 65534)
    with pytest.raises(StageCacheError, match="belongs to uid 65534"):
        StageCache(tmp_path / "c", 4 * MiB)


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StageCacheError, match="cannot use it as a directory"):
        StageCache(tmp_path / "link", 4 * MiB)


def test_changed_etag_misses_then_replaces_the_old_version(
    cache: StageCache, tmp_path: Path
) -> None:
    v1, v2 = ident(etag="e1"), ident(etag="e2")
    admit_file(cache, v1, make_source(tmp_path / "v1", MiB, seed=1))
    assert not fill_file(cache, v2, tmp_path / "dst")
    admit_file(cache, v2, make_source(tmp_path / "v2", MiB, seed=2))
    assert entries(cache.directory) == [entry_name(v2)]
    assert not fill_file(cache, v1, tmp_path / "old")
    assert fill_file(cache, v2, tmp_path / "new")
    assert (tmp_path / "new").read_bytes() == (tmp_path / "v2").read_bytes()
    assert cache.stats()["replaced"] == 1
    assert cache.stats()["bytes_cached"] == MiB


def test_other_keys_survive_a_replacement(cache: StageCache, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", MiB)
    admit_file(cache, ident(key="a"), src)
    admit_file(cache, ident(key="b"), src)
    admit_file(cache, ident(key="a", etag="e2"), src)
    assert fill_file(cache, ident(key="b"), tmp_path / "dst")


def test_entry_of_the_wrong_size_is_not_served(cache: StageCache, tmp_path: Path) -> None:
    obj = ident()
    admit_file(cache, obj, make_source(tmp_path / "src", MiB))
    os.truncate(cache.directory / entry_name(obj), MiB - 1)  # damaged behind our back
    dst = tmp_path / "dst"
    assert not fill_file(cache, obj, dst)
    assert dst.stat().st_size == 0
    assert entries(cache.directory) == []
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes_cached"] == 0


def test_another_size_is_another_object(cache: StageCache, tmp_path: Path) -> None:
    admit_file(cache, ident(size=MiB), make_source(tmp_path / "src", MiB))
    assert not fill_file(cache, ident(size=MiB + 1), tmp_path / "dst")


def test_source_not_of_the_object_size_is_not_admitted(cache: StageCache, tmp_path: Path) -> None:
    admit_file(cache, ident(size=MiB + 5), make_source(tmp_path / "src", MiB))
    assert entries(cache.directory) == []
    assert cache.stats()["admitted"] == 0


def test_lru_eviction_keeps_the_cache_under_its_bound(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache", 3 * MiB)
    try:
        src = make_source(tmp_path / "src", MiB)
        a, b, c, d = (ident(key=k) for k in "abcd")
        for obj in (a, b, c):
            admit_file(cache, obj, src)
        assert fill_file(cache, a, tmp_path / "dst")  # a is now more recent than b and c
        admit_file(cache, d, src)
        assert cache.stats()["evictions"] == 1
        assert sorted(entries(cache.directory)) == sorted(entry_name(o) for o in (a, c, d))
        assert cache.stats()["bytes_cached"] <= 3 * MiB
        assert not fill_file(cache, b, tmp_path / "dst")
    finally:
        cache.close()


def test_object_larger_than_the_cache_is_not_admitted(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache", 2 * MiB)
    try:
        admit_file(cache, ident(key="small"), make_source(tmp_path / "s", MiB))
        admit_file(cache, ident(key="big", size=3 * MiB), make_source(tmp_path / "b", 3 * MiB))
        assert entries(cache.directory) == [entry_name(ident(key="small"))]
        assert cache.stats()["evictions"] == 0
    finally:
        cache.close()


def test_restart_keeps_entries_and_their_recency(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", MiB)
    a, b, c = (ident(key=k) for k in "abc")
    first = StageCache(tmp_path / "cache", 3 * MiB)
    for obj in (a, b):
        admit_file(first, obj, src)
    old = time.time() - 100
    os.utime(tmp_path / "cache" / entry_name(a), (old - 100, old - 100))  # a older than b
    os.utime(tmp_path / "cache" / entry_name(b), (old, old))
    assert fill_file(first, a, tmp_path / "dst")  # touches a's mtime: now the most recent
    first.close()
    second = StageCache(tmp_path / "cache", 2 * MiB)
    try:
        assert second.stats()["entries"] == 2
        admit_file(second, c, src)  # evicts the least recently used: b
        assert fill_file(second, a, tmp_path / "dst2")
        assert not fill_file(second, b, tmp_path / "dst3")
    finally:
        second.close()


def test_concurrent_admits_of_one_object_write_it_once(
    cache: StageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path / "src", MiB)
    obj = ident()
    calls: list[int] = []
    real = stagecache.clone_into

    def slow_clone(src_fd: int, dst_fd: int, size: int) -> str:
        calls.append(size)
        time.sleep(0.2)  # every other admit arrives while this one copies
        return real(src_fd, dst_fd, size)

    monkeypatch.setattr(stagecache, "clone_into", slow_clone)
    barrier = threading.Barrier(6, timeout=10)

    def worker() -> None:
        barrier.wait()
        admit_file(cache, obj, src)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    assert calls == [MiB]
    assert entries(cache.directory) == [entry_name(obj)]
    assert cache.stats()["admitted"] == 1 and cache.stats()["bytes_cached"] == MiB


def test_concurrent_fills_and_admits_stay_consistent(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache", 4 * MiB)
    src = make_source(tmp_path / "src", MiB)
    objs = [ident(key=f"k{i}") for i in range(8)]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                obj = objs[(n + i) % len(objs)]
                dst = tmp_path / f"dst-{n}"
                if fill_file(cache, obj, dst):
                    assert dst.stat().st_size == MiB
                else:
                    admit_file(cache, obj, src)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors and not any(t.is_alive() for t in threads)
        stats = cache.stats()
        assert stats["bytes_cached"] <= 4 * MiB
        on_disk = [n for n in entries(cache.directory) if not n.startswith(TEMP_PREFIX)]
        assert len(on_disk) == stats["entries"]
        assert sum((cache.directory / n).stat().st_size for n in on_disk) == stats["bytes_cached"]
    finally:
        cache.close()


def test_failure_mid_admit_leaves_nothing_servable(
    cache: StageCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = make_source(tmp_path / "src", MiB)
    obj = ident()

    def half_then_fail(src_fd: int, dst_fd: int, size: int) -> str:
        os.write(dst_fd, os.pread(src_fd, size // 2, 0))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stagecache, "clone_into", half_then_fail)
    with caplog.at_level(logging.DEBUG, logger="plugin.staging.stagecache"):
        admit_file(cache, obj, src)  # never raises
        admit_file(cache, ident(key="other"), src)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert entries(cache.directory) == []
    monkeypatch.undo()
    assert not fill_file(cache, obj, tmp_path / "dst")
    assert cache.stats()["admitted"] == 0 and cache.stats()["bytes_cached"] == 0
    admit_file(cache, obj, src)  # the reservation was released: it can be admitted now
    assert fill_file(cache, obj, tmp_path / "dst")


def test_temp_entry_left_by_a_crash_is_removed_and_never_served(tmp_path: Path) -> None:
    obj = ident()
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    # What a kill -9 during a copy leaves: the full size already allocated, half the bytes.
    leftover = directory / f"{TEMP_PREFIX}{entry_name(obj)}.0badc0de"
    leftover.write_bytes(b"x" * (MiB // 2))
    os.truncate(leftover, MiB)
    cache = StageCache(directory, 4 * MiB)
    try:
        assert entries(directory) == []
        assert not fill_file(cache, obj, tmp_path / "dst")
    finally:
        cache.close()


def test_failed_fill_leaves_the_destination_empty(
    cache: StageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = ident()
    admit_file(cache, obj, make_source(tmp_path / "src", MiB))

    def half_then_fail(src_fd: int, dst_fd: int, size: int) -> str:
        os.write(dst_fd, os.pread(src_fd, size // 2, 0))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stagecache, "clone_into", half_then_fail)
    dst = tmp_path / "dst"
    assert not fill_file(cache, obj, dst)
    assert dst.stat().st_size == 0
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 1


def test_empty_object_round_trip(cache: StageCache, tmp_path: Path) -> None:
    obj = ident(size=0)
    (tmp_path / "empty").write_bytes(b"")
    admit_file(cache, obj, tmp_path / "empty")
    assert fill_file(cache, obj, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b""


# -- reflink on a real XFS --------------------------------------------------------------------


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    """A fresh XFS with reflink=1 on a loop device; unmounted and detached even on failure."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    missing = [
        t for t in ("mkfs.xfs", "losetup", "mount", "umount", "filefrag") if not shutil.which(t)
    ]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian: xfsprogs, util-linux, e2fsprogs)")
    size = 320 * MiB  # sparse; mkfs.xfs refuses filesystems under 300 MB
    mkfs = ("mkfs.xfs", "-q", "-f", "-m", "reflink=1")
    with loop_mounted(tmp_path / "xfs.img", tmp_path / "mnt", size, mkfs) as mnt:
        yield mnt


def _shared_extents(path: Path) -> bool:
    return "shared" in run("filefrag", "-v", str(path))


def test_fill_reflinks_on_xfs(xfs_mount: Path, tmp_path: Path) -> None:
    size = 8 * MiB
    src = make_source(xfs_mount / "download", size)
    cache = StageCache(xfs_mount / "cache", 64 * MiB)
    try:
        obj = ident(size=size)
        admit_file(cache, obj, src)
        volume = xfs_mount / "volume"
        volume.mkdir()
        assert fill_file(cache, obj, volume / "a.bin")
        assert (volume / "a.bin").read_bytes() == src.read_bytes()
        assert cache.stats()["bytes_reflinked"] == size
        assert _shared_extents(volume / "a.bin")
        assert _shared_extents(cache.directory / entry_name(obj))
        # Onto another filesystem (the ext4 of tmp_path) it falls back to a copy.
        assert fill_file(cache, obj, tmp_path / "elsewhere.bin")
        assert (tmp_path / "elsewhere.bin").read_bytes() == src.read_bytes()
        assert cache.stats()["bytes_reflinked"] == size and cache.stats()["hits"] == 2
    finally:
        cache.close()


def test_fill_copies_where_reflink_is_missing(cache: StageCache, tmp_path: Path) -> None:
    """tmp_path is ext4 here (no FICLONE): the copy_file_range path serves the same bytes."""
    obj = ident(size=3 * MiB + 7)
    src = make_source(tmp_path / "src", 3 * MiB + 7)
    admit_file(cache, obj, src)
    assert fill_file(cache, obj, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()


# -- the daemon flags -------------------------------------------------------------------------


def test_parse_stage_cache_examples() -> None:
    assert parse_stage_cache("/var/cache/stowage/", "20G") == (Path("/var/cache/stowage"), 20 << 30)
    assert parse_stage_cache("/c", "512M") == (Path("/c"), 512 * MiB)
    with pytest.raises(ValueError, match="absolute path"):
        parse_stage_cache("cache", "1G")
    with pytest.raises(ValueError, match="--stage-cache:"):
        parse_stage_cache("", "1G")
    with pytest.raises(ValueError, match="--stage-cache-size 'lots'"):
        parse_stage_cache("/c", "lots")
    with pytest.raises(ValueError, match="at least"):
        parse_stage_cache("/c", "1K")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(directory=st.text(max_size=40), size=st.text(max_size=40))
def test_parse_stage_cache_accepts_or_explains(directory: str, size: str) -> None:
    try:
        path, limit = parse_stage_cache(directory, size)
    except ValueError as exc:
        assert str(exc).startswith("--stage-cache")
    else:
        assert path.is_absolute() and limit >= MIN_CACHE_BYTES


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(min_value=1, max_value=1 << 20), unit=st.sampled_from(["M", "G", "T"]))
def test_parse_stage_cache_sizes(n: int, unit: str) -> None:
    factor = {"M": MiB, "G": 1 << 30, "T": 1 << 40}[unit]
    assert parse_stage_cache("/c", f"{n}{unit}") == (Path("/c"), n * factor)


# -- through the copy engine -------------------------------------------------------------------


class CountingStore:
    """The engine's real store, counting the requests that carry object bytes (GETs)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gets = 0
        self.lock = threading.Lock()

    def get(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.gets += 1
        return self.inner.get(*args, **kwargs)

    def get_many(self, bucket: str, keys: list[str], max_size: int) -> Any:
        with self.lock:
            self.gets += len(keys)
        return self.inner.get_many(bucket, keys, max_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.s3
def test_second_volume_staged_from_the_cache_and_changed_object_refetched(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    sizes = {"model/big-a.bin": 9 * MiB + 5, "model/big-b.bin": 3 * MiB, "model/small.txt": 700}
    local = {
        k: rclone_s3.put_random(bucket, k, n, tmp_path, seed=i)
        for i, (k, n) in enumerate(sizes.items())
    }
    cache = StageCache(tmp_path / "cache", 64 * MiB)
    s3 = S3Options(endpoint_url=rclone_s3.endpoint)
    opts = CopyOptions(jobs=4, object_cache=cache)

    def stage(volume: str) -> tuple[CopyResult, int]:
        store = CountingStore(make_store(s3, opts))
        try:
            result = copy(f"s3://{bucket}/model/", str(tmp_path / volume), opts, store=store)
        finally:
            store.close()
        assert result.ok, result.errors
        for key, path in local.items():
            staged = tmp_path / volume / key.removeprefix("model/")
            assert staged.read_bytes() == path.read_bytes()
        return result, store.gets

    try:
        first, first_gets = stage("vol1")
        assert first.files_from_cache == 0 and first_gets >= 3
        assert cache.stats()["entries"] == 3
        second, second_gets = stage("vol2")
        assert second_gets == 0
        assert second.files_from_cache == 3 and second.bytes_from_cache == sum(sizes.values())
        local["model/big-b.bin"] = rclone_s3.put_random(
            bucket, "model/big-b.bin", 3 * MiB, tmp_path, seed=99
        )
        third, third_gets = stage("vol3")
        assert third_gets >= 1
        assert third.files_from_cache == 2
        assert cache.stats()["replaced"] == 1 and cache.stats()["entries"] == 3
    finally:
        cache.close()
