"""Streamed reads (plugin/fusefs/stream.py) against an in-memory object store: every byte a
reader gets is the object's, whatever the read sizes, writes, failures and buffer pressure."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

trio = pytest.importorskip("trio")

from trio.testing import wait_all_tasks_blocked  # noqa: E402

from plugin.fusefs import stream  # noqa: E402
from plugin.fusefs.cache import INITIAL_WINDOW, DataCache  # noqa: E402
from plugin.fusefs.entry import CacheEntry  # noqa: E402
from plugin.fusefs.errors import RemoteError, StaleError  # noqa: E402
from plugin.fusefs.store import UploadConfig  # noqa: E402

KiB = 1 << 10
PART = 512 * KiB  # small parts: a few MiB cross many part boundaries
#: The first read of a file (not yet known to be sequential) fetches this much into the file.
FIRST = INITIAL_WINDOW // PART + 1


class MemoryStore:
    """The two GET paths of ObjectStore, served from bytes; records what was asked."""

    def __init__(self, data: bytes, etag: str = "v1") -> None:
        self.data = data
        self.etag = etag
        self.streamed: list[tuple[int, int]] = []
        self.fetched: list[tuple[int, int]] = []
        #: GETs reaching past this offset fail, as if the server went down there.
        self.down_from: int | None = None

    def _check(self, end: int, etag: str | None) -> None:
        if etag and etag != self.etag:
            raise StaleError("get: the object changed on the server")
        if self.down_from is not None and end > self.down_from:
            raise RemoteError("get: connection refused")

    async def fetch_buffer(
        self,
        key: str,
        start: int,
        end: int,
        buf: memoryview,
        *,
        etag: str | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.streamed.append((start, end))
        # Bytes arrive in pieces, readers run in between (a real GET runs in a thread).
        for pos in range(start, end, 96 * KiB):
            await trio.sleep(0)
            piece_end = min(pos + 96 * KiB, end)
            self._check(piece_end, etag)
            buf[pos - start : piece_end - start] = self.data[pos:piece_end]
            if progress is not None:
                progress(piece_end - start)

    async def fetch_into(
        self,
        key: str,
        start: int,
        end: int,
        fd: int,
        gaps: list[tuple[int, int]],
        *,
        etag: str | None,
    ) -> None:
        await trio.sleep(0)
        self._check(end, etag)
        self.fetched.append((start, end))
        for s, e in gaps:
            os.pwrite(fd, self.data[max(s, start) : min(e, end)], max(s, start))


def make_cache(tmp_path: Path, store: MemoryStore, buffers: int = 4) -> DataCache:
    return DataCache(
        store,  # type: ignore[arg-type]
        tmp_path / "cache",
        max_size=1 << 30,
        readahead_max=1 << 20,
        upload=UploadConfig(),
        stream_part=PART,
        stream_buffers=buffers,
    )


def entry_for(cache: DataCache, store: MemoryStore) -> CacheEntry:
    cache.cache_dir.mkdir(exist_ok=True)
    return cache.new_entry(remote_key="obj", remote_size=len(store.data), remote_etag=store.etag)


async def read_all(cache: DataCache, entry: CacheEntry, size: int, start: int = 0) -> bytes:
    ra = cache.read_ahead()
    out = bytearray()
    pos = start
    while chunk := bytes(await cache.read(entry, pos, size, ra)):
        out += chunk
        pos += len(chunk)
    return bytes(out)


@pytest.mark.parametrize("step", [64 * KiB, 1 << 20])
@pytest.mark.parametrize("read_size", [16 * KiB, 48 * KiB + 5, PART, 3 * PART + 1])
def test_sequential_reads_of_any_size_get_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int, step: int
) -> None:
    monkeypatch.setattr(stream, "ARRIVAL_STEP", step)  # serve parts as they arrive, or whole
    store = MemoryStore(os.urandom(12 * PART + 777))
    cache = make_cache(tmp_path, store)
    entry = entry_for(cache, store)

    async def _run() -> None:
        assert await read_all(cache, entry, read_size) == store.data
        assert cache.stream_pool.in_use <= cache.stream_pool.count
        entry.end_stream()
        assert cache.stream_pool.in_use == 0

    trio.run(_run)
    assert store.streamed, "a sequential reader never streamed"
    # Streamed bytes never land in the cache file: it holds only the first, unstreamed read.
    assert sum(e - s for s, e in store.fetched) <= max(read_size, INITIAL_WINDOW)
    assert not entry.present.covers(0, len(store.data))


def test_write_ends_the_stream_and_reads_see_the_written_bytes(tmp_path: Path) -> None:
    store = MemoryStore(os.urandom(12 * PART))
    cache = make_cache(tmp_path, store)
    entry = entry_for(cache, store)
    expected = bytearray(store.data)

    async def _run() -> None:
        ra = cache.read_ahead()
        for pos in range(0, (FIRST + 1) * PART, 16 * KiB):  # streaming, parts ahead in flight
            await cache.read(entry, pos, 16 * KiB, ra)
        assert entry.stream is not None and entry.stream.parts
        patch = os.urandom(1000)
        at = (FIRST + 3) * PART - 10  # across a part boundary, in a part read ahead
        await cache.write(entry, at, patch)
        expected[at : at + len(patch)] = patch
        assert entry.stream is None
        assert await read_all(cache, entry, 16 * KiB) == bytes(expected)
        await trio.sleep(0.01)  # let GETs of dropped parts finish and hand back buffers
        assert cache.stream_pool.in_use == 0

    trio.run(_run)


def test_failed_gets_give_an_error_never_zeros_then_reads_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "ARRIVAL_STEP", 64 * KiB)
    store = MemoryStore(os.urandom(12 * PART))
    down = (FIRST + 3) * PART + 200 * KiB
    store.down_from = down
    cache = make_cache(tmp_path, store)
    entry = entry_for(cache, store)

    async def _run() -> None:
        ra = cache.read_ahead()
        pos = 0
        with pytest.raises(RemoteError):
            while pos < len(store.data):
                chunk = bytes(await cache.read(entry, pos, 16 * KiB, ra))
                # Bytes before the failure are the object's, never zeros.
                assert chunk == store.data[pos : pos + len(chunk)]
                pos += len(chunk)
        # Up to the failing part, or into it (what arrived before the failure); a retry of
        # the failed part may fail first, depending on scheduling.
        assert (FIRST + 2) * PART <= pos < down
        store.down_from = None  # the server is back: the same reader goes on
        rest = await read_all(cache, entry, 16 * KiB, start=pos)
        assert rest == store.data[pos:]

    trio.run(_run)


def test_replaced_object_is_stale_not_mixed(tmp_path: Path) -> None:
    store = MemoryStore(os.urandom(12 * PART))
    cache = make_cache(tmp_path, store, buffers=2)
    entry = entry_for(cache, store)

    async def _run() -> None:
        ra = cache.read_ahead()
        old = store.data
        pos = 0
        while pos < (FIRST + 1) * PART:
            chunk = bytes(await cache.read(entry, pos, 16 * KiB, ra))
            assert chunk == old[pos : pos + len(chunk)]
            pos += len(chunk)
        store.data, store.etag = os.urandom(len(old)), "v2"
        with pytest.raises(StaleError):
            while pos < len(old):
                chunk = bytes(await cache.read(entry, pos, 16 * KiB, ra))
                assert chunk == old[pos : pos + len(chunk)], pos
                pos += len(chunk)

    trio.run(_run)


def test_busy_buffers_fall_back_to_the_cache_file(tmp_path: Path) -> None:
    store = MemoryStore(os.urandom(12 * PART))
    cache = make_cache(tmp_path, store, buffers=2)
    first = entry_for(cache, store)
    second = entry_for(cache, store)

    async def _run() -> None:
        ra = cache.read_ahead()
        pos = 0
        while cache.stream_pool.in_use < 2 and pos < len(store.data):
            pos += len(await cache.read(first, pos, 16 * KiB, ra))  # the first reader's parts
        assert cache.stream_pool.in_use == 2
        assert await read_all(cache, second, 16 * KiB) == store.data
        # Neither buffer was free: all of it came through the cache file.
        assert second.present.covers(0, len(store.data))
        first.end_stream()
        await trio.sleep(0.01)
        assert cache.stream_pool.in_use == 0

    trio.run(_run)


def test_no_buffers_means_no_streaming(tmp_path: Path) -> None:
    store = MemoryStore(os.urandom(12 * PART))
    cache = make_cache(tmp_path, store, buffers=0)
    entry = entry_for(cache, store)
    assert trio.run(read_all, cache, entry, 16 * KiB) == store.data
    assert store.streamed == []


def test_part_hands_out_bytes_as_they_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "ARRIVAL_STEP", 64 * KiB)

    async def _run() -> None:
        part = stream.MemPart(0, PART, 2 * PART, mmap.mmap(-1, PART), "v1")
        part.progress(100 * KiB)  # as a worker thread would, mid-GET
        await wait_all_tasks_blocked()
        assert part.ready == 64 * KiB  # whole steps only
        assert part.arrivals[0].is_set() and not part.arrivals[1].is_set()
        with trio.fail_after(1):
            await part.wait_for(PART + 64 * KiB)  # in place: no wait
        with trio.move_on_after(0.05) as waited:
            await part.wait_for(PART + 65 * KiB)
        assert waited.cancelled_caught  # not there yet
        part.error = RemoteError("connection reset")
        part.finished()
        with trio.fail_after(1):
            await part.wait_for(2 * PART)  # a failed GET wakes its readers...
        assert part.ready == 64 * KiB  # ...without claiming bytes that never came

        whole = stream.MemPart(1, 2 * PART, 2 * PART + 1000, mmap.mmap(-1, PART), "v1")
        whole.progress(1000)  # the last, short step counts once it is complete
        await wait_all_tasks_blocked()
        assert whole.ready == 1000 and all(e.is_set() for e in whole.arrivals)

    trio.run(_run)


def test_pool_memory_goes_back_once_the_last_buffer_returns() -> None:
    pool = stream.BufferPool(PART, 2)
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None and pool.take() is None  # bounded
    pool.give(a)
    assert pool.take() is a  # reused, not new memory
    pool.trim()  # the stream ended while a GET still fills its last part
    pool.give(a)
    assert pool._free == [a]  # still in use elsewhere: kept
    pool.give(b)
    assert pool.in_use == 0 and pool._free == []  # the last one back: all unmapped


def test_a_temporary_cache_directory_goes_unless_uploads_wait_in_it(tmp_path: Path) -> None:
    """`python -m plugin.fusefs` without --cache-dir removes its directory at exit, but never
    one holding an upload journal: that data has not reached S3 yet."""
    for unsent in (False, True):
        cache = make_cache(tmp_path / str(unsent), MemoryStore(b"x"))
        assert cache.open_dir() == []
        (cache.cache_dir / "abc.data").write_bytes(b"cached or unsent bytes")
        if unsent:
            (cache.cache_dir / "abc.json").write_text('{"key": "k"}')
        cache.close_dir()
        assert cache.remove_dir_unless_unsent() is not unsent
        assert cache.cache_dir.exists() is unsent
