"""The create path of the S3 filesystem (issue 14: creates at >= 1.2x s3fs).

A small-file create is a LOOKUP of the new name (HEAD 404, then a LIST in case it is a
directory), then a PUT in close(). On this 2-core machine each hand-off to a worker thread
costs about 0.15 ms, as much as a request to a loopback server, so:

* a lookup of a new name is one worker job (HEAD, and LIST only after a 404), or none at
  all from the loop itself (plugin.fusefs.loopio);
* in a create burst (lookups below one directory keep finding nothing) the HEAD and the
  LIST go out pipelined, in one round trip, and a lookup that finds a file ends the burst,
  so reading existing files never pays a LIST (a LIST costs more than a HEAD on AWS);
* an upload reads the cache file and sends it in one worker job (none from the loop);
* closing a file no longer walks every cached entry to see whether the cache is too big.

These tests run the filesystem in-process against a real server (no kernel mount) and count
what the mechanisms promise: worker jobs, requests, pipelining.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

trio = pytest.importorskip("trio")
pyfuse3 = pytest.importorskip("pyfuse3")

from harness.counting_proxy import CountingProxy, counting_proxy  # noqa: E402
from harness.s3servers import S3Server  # noqa: E402

from plugin.fusefs.cache import DataCache  # noqa: E402
from plugin.fusefs.errors import NotFoundError  # noqa: E402
from plugin.fusefs.fs import CREATE_BURST_MISSES, FsConfig, S3Filesystem  # noqa: E402
from plugin.fusefs.store import ListPage, ObjectInfo, ObjectStore, UploadConfig  # noqa: E402
from plugin.s3.fast import FastClient, from_boto3_client  # noqa: E402

ROOT = pyfuse3.ROOT_INODE
MiB = 1 << 20


def _fast(server: S3Server, bucket: str, endpoint: str | None = None) -> FastClient:
    client = server.client(endpoint_url=endpoint) if endpoint else server.client()
    fast = from_boto3_client(client, bucket)
    assert fast is not None
    return fast


def _filesystem(
    server: S3Server, bucket: str, cache_dir: Path, endpoint: str | None = None
) -> S3Filesystem:
    client = server.client(endpoint_url=endpoint) if endpoint else server.client()
    store = ObjectStore(client, bucket)
    store.fast_client = from_boto3_client(client, bucket)
    cache = DataCache(
        store, cache_dir, max_size=64 * MiB, readahead_max=8 * MiB, upload=UploadConfig()
    )
    cache.open_dir()
    return S3Filesystem(store, cache, FsConfig(dir_markers=False))


@pytest.fixture
def proxied_fs(rclone_server: S3Server, tmp_path: Path) -> Iterator[tuple[S3Filesystem, Any]]:
    """A filesystem whose requests go through a counting proxy; the bucket holds d/old0..4
    and the directory d/sub/."""
    bucket = rclone_server.new_bucket()
    s3 = rclone_server.client()
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"d/old{i}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="d/sub/inside", Body=b"y")
    with counting_proxy(rclone_server.endpoint) as proxy:
        fs = _filesystem(rclone_server, bucket, tmp_path / "cache", proxy.endpoint)
        try:
            yield fs, proxy
        finally:
            assert fs.store.fast_client is not None
            fs.store.fast_client.close()
            fs.cache.close_dir()


def _count_worker_jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every hand-off to a worker thread (by the called function's name)."""
    jobs: list[str] = []
    real = trio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(fn, "__name__", type(fn).__name__))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return jobs


@pytest.mark.parametrize(("loop_io", "jobs_wanted"), [(True, 0), (False, 1)])
def test_lookup_of_a_new_name_takes_no_worker_job_or_one(
    proxied_fs: tuple[S3Filesystem, CountingProxy],
    monkeypatch: pytest.MonkeyPatch,
    loop_io: bool,
    jobs_wanted: int,
) -> None:
    """From the loop (plugin.fusefs.loopio) no worker thread at all; from worker threads
    HEAD and LIST in one job."""
    fs, proxy = proxied_fs
    fs.store.loop_io = loop_io

    async def run() -> None:
        with trio.fail_after(20):
            d = await fs.lookup(ROOT, b"d")
            jobs = _count_worker_jobs(monkeypatch)
            with pytest.raises(NotFoundError):
                await fs.lookup(d.inode, b"new-file")
            assert len(jobs) == jobs_wanted, jobs
            # ... and it still asked both questions: no file, no directory.
            assert proxy.count("HEAD", f"/{fs.store.bucket}/d/new-file") == 1
            assert proxy.count("GET", f"/{fs.store.bucket}", listing=True) >= 1
            await fs.store.aclose()

    trio.run(run)


@pytest.mark.parametrize(("loop_io", "jobs_wanted"), [(True, 0), (False, 1)])
def test_upload_of_a_small_file_takes_no_worker_job_or_one(
    proxied_fs: tuple[S3Filesystem, CountingProxy],
    monkeypatch: pytest.MonkeyPatch,
    loop_io: bool,
    jobs_wanted: int,
) -> None:
    """From the loop no worker thread; from worker threads the cache file's read and the PUT
    in one job."""
    fs, proxy = proxied_fs
    fs.store.loop_io = loop_io
    body = os.urandom(64 * 1024)

    async def run() -> None:
        with trio.fail_after(20):
            d = await fs.lookup(ROOT, b"d")
            fh, _node = await fs.create(d.inode, b"made", 0o100644, 0, 0)
            await fs.write(fh, 0, body)
            jobs = _count_worker_jobs(monkeypatch)
            await fs.flush(fh)
            await fs.release(fh)
            assert len(jobs) == jobs_wanted, jobs
            await fs.store.aclose()

    trio.run(run)
    assert proxy.count("PUT", f"/{fs.store.bucket}/d/made") == 1
    got = fs.store.client.get_object(Bucket=fs.store.bucket, Key="d/made")["Body"].read()
    assert got == body


def test_a_create_burst_pipelines_head_and_list_and_a_hit_ends_it(
    proxied_fs: tuple[S3Filesystem, CountingProxy],
) -> None:
    fs, proxy = proxied_fs
    fast = fs.store.fast_client
    assert fast is not None

    def lists() -> int:
        return proxy.count("GET", listing=True)

    async def run() -> None:
        with trio.fail_after(30):
            d = await fs.lookup(ROOT, b"d")
            # Existing files, looked up cold: HEADs only, never a LIST.
            before = lists()
            for i in range(3):
                await fs.lookup(d.inode, f"old{i}".encode())
            assert lists() == before
            assert not fast.pipelining_proven
            # New names: after CREATE_BURST_MISSES misses the pair goes out pipelined.
            for i in range(CREATE_BURST_MISSES + 3):
                with pytest.raises(NotFoundError):
                    await fs.lookup(d.inode, f"new{i}".encode())
            assert fast.pipelining_proven  # only a pipelined batch answered whole sets it
            assert d.misses_in_a_row == CREATE_BURST_MISSES + 3
            # Inside the burst a lookup of an existing file sends the LIST along (dropped)...
            before = lists()
            node = await fs.lookup(d.inode, b"old3")
            assert not node.is_dir and lists() == before + 1
            # ... and ends the burst: the next existing file costs a HEAD only.
            assert d.misses_in_a_row == 0
            await fs.lookup(d.inode, b"old4")
            assert lists() == before + 1
            # A directory is still found as one, burst or not.
            for i in range(CREATE_BURST_MISSES):
                with pytest.raises(NotFoundError):
                    await fs.lookup(d.inode, f"more{i}".encode())
            sub = await fs.lookup(d.inode, b"sub")
            assert sub.is_dir
            await fs.store.aclose()

    trio.run(run)


@pytest.mark.parametrize("together", [False, True])
def test_head_then_list_answers_file_directory_and_nothing(
    s3_server: S3Server, together: bool
) -> None:
    """On both servers: rclone pipelines; moto does not, and the client notices (after one
    trial of at most 1 s) and asks one request after the other, with the same answers."""
    bucket = s3_server.new_bucket()
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="a/file", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="a/dir/x", Body=b"")
    fast = _fast(s3_server, bucket)
    try:
        for _ in range(2):  # the second round runs on what the first learnt
            (status, headers), listed = fast.head_then_list("a/file", "a/file/", together=together)
            assert (status, headers["content-length"], listed) == (200, "5", None)
            (status, _), listed = fast.head_then_list("a/dir", "a/dir/", together=together)
            assert status == 404 and listed is not None
            assert [p["Prefix"] for p in listed.get("CommonPrefixes", [])] + [
                o["Key"] for o in listed.get("Contents", [])
            ] == ["a/dir/x"]
            (status, _), listed = fast.head_then_list("a/none", "a/none/", together=together)
            assert status == 404 and listed is not None
            assert not listed.get("Contents") and not listed.get("CommonPrefixes")
        if together:
            assert fast.pipelining == (s3_server.kind == "rclone")
    finally:
        fast.close()


def test_store_stat_answers_with_the_object_or_the_directory_probe(
    rclone_server: S3Server,
) -> None:
    bucket = rclone_server.new_bucket()
    s3 = rclone_server.client()
    s3.put_object(Bucket=bucket, Key="f", Body=b"abc", Metadata={"mode": "33188"})
    s3.put_object(Bucket=bucket, Key="dir/x", Body=b"")
    store = ObjectStore(s3, bucket)
    store.fast_client = _fast(rclone_server, bucket)

    async def run() -> None:
        with trio.fail_after(20):
            for expect_missing in (False, True):
                found = await store.stat("f", "f/", expect_missing=expect_missing)
                assert isinstance(found, ObjectInfo)
                assert (found.size, found.metadata.get("mode")) == (3, "33188")
                found = await store.stat("dir", "dir/", expect_missing=expect_missing)
                assert isinstance(found, ListPage) and (found.files or found.dirs)
                found = await store.stat("none", "none/", expect_missing=expect_missing)
                assert isinstance(found, ListPage) and not found.files and not found.dirs
            assert store.fast_client is not None
            store.fast_client.enabled = False  # the general client gives the same answers
            assert isinstance(await store.stat("f", "f/"), ObjectInfo)
            found = await store.stat("none", "none/")
            assert isinstance(found, ListPage) and not found.files and not found.dirs
            await store.aclose()

    try:
        trio.run(run)
    finally:
        store.fast_client.close()


def test_cache_usage_follows_entry_sizes_and_closing_walks_nothing_under_the_limit(
    tmp_path: Path,
) -> None:
    store = ObjectStore(object(), "unused")
    cache = DataCache(
        store, tmp_path / "cache", max_size=1 * MiB, readahead_max=MiB, upload=UploadConfig()
    )
    cache.open_dir()

    class NoWalk:
        def __iter__(self) -> Iterator[Any]:
            raise AssertionError("evict walked the entries while the cache fits")

    async def run() -> None:
        a = cache.new_entry(remote_key=None, remote_size=0, remote_etag=None)
        b = cache.new_entry(remote_key="k", remote_size=1000, remote_etag="e")
        assert cache.usage.bytes == 1000
        await cache.write(a, 0, b"x" * 5000)
        await cache.write(a, 100, b"y" * 10)  # inside: no growth
        assert cache.usage.bytes == 6000
        await cache.truncate(b, 10)
        assert cache.usage.bytes == 5010
        cache.evict(NoWalk())  # type: ignore[arg-type]
        b.close()
        assert cache.usage.bytes == 5000
        b.close()  # twice is once
        assert cache.usage.bytes == 5000
        a.close()
        assert cache.usage.bytes == 0

    try:
        trio.run(run)
    finally:
        cache.close_dir()
