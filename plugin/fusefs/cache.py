"""Local data cache: one sparse file per open S3 object, filled by ranged GETs on demand.

Invariants (the S3 filesystem's data path relies on them):

* A byte in `[0, size)` is valid locally iff it lies in `present` or at/after `remote_size`
  (the tail beyond the remote object is zeros or data written here). Missing bytes below
  `remote_size` are fetched from `remote_key` before they are read or uploaded.
* A dirty entry is never evicted or deleted, except when its file is unlinked. If an upload
  fails, the data stays in `<cache_dir>/<id>.data` with a `<id>.json` journal naming the key
  and metadata, so a later flush, the retry task or the next mount can upload it.
* `lock` serialises writes, truncates and uploads. Fetches (ranged GETs into the file) run
  without it, each over a range that was missing when it started and that no other fetch
  covers; a write or truncate first waits for the fetches overlapping its range, so late
  remote bytes never overwrite local changes. A range joins `present` only once its GET
  completed, so a reader never sees bytes that did not come from the object.
* The file descriptor stays open while fetches write to it, even after `close()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import KW_ONLY, InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from plugin.atomic import write_atomically
from plugin.fusefs.entry import CacheEntry, CacheUsage, Fetch, Ranges
from plugin.fusefs.errors import FsError, RemoteError, StaleError, UploadFailedError
from plugin.fusefs.stats import FuseStats
from plugin.fusefs.store import ObjectStore, UploadConfig
from plugin.fusefs.stream import STREAM_BUFFERS, STREAM_PART, BufferPool, MemPart, Stream

if TYPE_CHECKING:
    from plugin.fusefs.inodes import Node

#: Names other modules import from here.

log = logging.getLogger(__name__)

MiB = 1 << 20

#: First fetch for a reader not (yet) known to be sequential: 1 MiB plus the kernel's own
#: 128 KiB read-ahead, so a sequential reader's second kernel request is already local
#: (mountpoint-s3's INITIAL_REQUEST_SIZE), while a random 4 KiB reader pulls little.
INITIAL_WINDOW = MiB + 128 * 1024
MAX_FORWARD = 16 * MiB
MAX_BACKWARD = MiB
#: Read-ahead part: fetches are cut at multiples of this. AWS and mountpoint-s3 use 8 MiB;
#: on a 2-core box per-GET CPU (botocore) matters more: a cold 1 GiB read from a loopback
#: server took 1.8-1.9 s with 8 MiB parts, 1.4-1.5 s with 32 MiB and 1.2 s with 64 MiB.
PART_SIZE = 64 * MiB
#: What a sequential reader waits for when it reaches missing bytes: not a whole part, so
#: the first bytes come quickly; read-ahead fetches the rest of the part meanwhile.
NEEDED_CHUNK = 8 * MiB
#: Ranged GETs in flight per file for read-ahead (needed bytes are always fetched).
READAHEAD_STREAMS = 8


def _fetch_error(entry: CacheEntry, err: Exception) -> RemoteError:
    """What a reader gets for a failed GET: stale stays stale, anything else is remote."""
    if isinstance(err, StaleError):
        return StaleError(str(err))
    if isinstance(err, FsError):
        return RemoteError(str(err))
    return RemoteError(f"fetch of {entry.remote_key} failed: {err}")


@dataclass
class ReadAhead:
    """Per-handle sequential detector. Once a reader is sequential the window ahead of it
    doubles on every read up to `max_window`; a seek resets it, so random readers do not
    pull megabytes per 4 KiB.

    The kernel has several READs in flight (async read-ahead), so they arrive slightly out
    of order; offsets near the expected one still count as sequential (mountpoint-s3 allows
    16 MiB forward and 1 MiB backward).
    """

    max_window: int
    next_offset: int = -1
    window: int = INITIAL_WINDOW
    sequential: bool = False
    #: Parts up to here have been fetched or requested for this reader.
    ahead_end: int = 0

    def observe(self, offset: int, end: int) -> bool:
        """Record a read of `[offset, end)`; True if it continues a sequential stream."""
        seq = self.next_offset >= 0 and (
            self.next_offset - MAX_BACKWARD <= offset <= self.next_offset + MAX_FORWARD
        )
        if seq:
            self.window = min(max(self.window * 2, NEEDED_CHUNK), self.max_window)
            self.next_offset = max(self.next_offset, end)
        else:
            self.window = min(INITIAL_WINDOW, self.max_window)
            self.next_offset = end
            self.ahead_end = 0
        self.sequential = seq
        return seq


@contextlib.contextmanager
def _get_failure_kept(job: Fetch | MemPart, what: str, key: str | None) -> Iterator[None]:
    """Keep a failed GET's error on *job* for the readers waiting on it, instead of raising
    it into the loop; an interruption (cancellation) is kept and raised."""
    try:
        yield
    except Exception as exc:
        job.error = exc
        log.warning("%s of %s [%d, %d) failed: %s", what, key, job.start, job.end, exc)
    except BaseException:
        job.error = RemoteError(f"{what} of {key} was interrupted")
        raise


@dataclass(eq=False)
class DataCache:
    """Owns the cache directory, the entries' local files and every data transfer."""

    store: ObjectStore
    cache_dir: Path
    _: KW_ONLY
    max_size: int
    readahead_max: int
    upload: UploadConfig
    readahead_streams: int = READAHEAD_STREAMS
    part_size: int = PART_SIZE
    stream_part: InitVar[int] = STREAM_PART
    stream_buffers: InitVar[int] = STREAM_BUFFERS
    _lock_fd: int | None = field(default=None, init=False)
    #: Counters for the daemon's metrics (plugin.fusefs.stats).
    stats: FuseStats = field(default_factory=FuseStats, init=False)
    #: Bytes held by open entries, kept by the entries themselves.
    usage: CacheUsage = field(default_factory=CacheUsage, init=False)

    def __post_init__(self, stream_part: int, stream_buffers: int) -> None:
        #: Buffers for streamed reads; zero buffers turns streaming off.
        self.stream_pool = BufferPool(stream_part, stream_buffers)

    def open_dir(self) -> list[dict[str, object]]:
        """Lock the cache directory and return the journals of uploads left by a previous run.

        Clean data files from earlier runs are deleted: nothing refers to them any more.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(
            self.cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"cache directory {self.cache_dir} is used by another process"
            ) from None
        pending = []
        journaled = set()
        for journal in sorted(self.cache_dir.glob("*.json")):
            try:
                info = json.loads(journal.read_text())
                info["data_path"] = str(journal.with_suffix(".data"))
                pending.append(info)
                journaled.add(journal.with_suffix(".data"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable upload journal %s", journal, exc_info=True)
        for data in self.cache_dir.glob("*.data"):
            if data not in journaled:
                data.unlink(missing_ok=True)
        return pending

    def close_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_dir_unless_unsent(self) -> bool:
        """Delete the (closed) cache directory unless upload journals remain in it, which a
        later run on the same directory sends. True if it was removed."""
        if any(self.cache_dir.glob("*.json")):
            return False
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        return True

    def new_entry(
        self, *, remote_key: str | None, remote_size: int, remote_etag: str | None
    ) -> CacheEntry:
        path = self.cache_dir / f"{uuid.uuid4().hex}.data"
        return CacheEntry(
            path,
            remote_key=remote_key,
            remote_size=remote_size,
            remote_etag=remote_etag,
            usage=self.usage,
        )

    def read_ahead(self) -> ReadAhead:
        return ReadAhead(max_window=self.readahead_max)

    async def read(
        self, entry: CacheEntry, offset: int, size: int, ra: ReadAhead
    ) -> bytes | memoryview:
        entry.last_used = time.monotonic()
        end = min(offset + size, entry.size)
        if offset >= end:
            return b""
        sequential = ra.observe(offset, end)
        stream = self._stream_for(entry, end, sequential=sequential)
        if stream is not None:
            streamed = await self._read_streamed(entry, stream, offset, end, sequential=sequential)
            if streamed is not None:
                return streamed
        # A read the stream could not serve (a piece before it began, no buffer free): the
        # cache file gets what this read needs, and the parts ahead keep streaming.
        streaming = stream is not None and bool(stream.parts)
        need_end = min(end, entry.remote_size)
        if offset < need_end and not entry.present.covers(offset, need_end):
            if streaming:
                fetch_end = need_end
            elif sequential:
                fetch_end = min(
                    -(-need_end // self.part_size) * self.part_size, offset + NEEDED_CHUNK
                )
            else:
                fetch_end = offset + ra.window
            self._fetch_missing(entry, offset, max(need_end, fetch_end))
        if sequential and not streaming:
            # Before waiting: the parts ahead download while this one completes.
            self._read_ahead(entry, ra, end)
        if offset < need_end:
            await self._ensure(entry, offset, need_end)
        return os.pread(entry.fd, end - offset, offset)

    def _stream_for(self, entry: CacheEntry, end: int, *, sequential: bool) -> Stream | None:
        """The entry's stream if this read may use one, started for a sequential reader."""
        if entry.dirty:
            entry.end_stream()  # local bytes live only in the cache file
            return None
        if entry.remote_key is None or end > entry.remote_size or self.stream_pool.count == 0:
            return None
        if entry.stream is None and sequential:
            entry.stream = Stream(self.stream_pool, self.stream_pool.size)
        return entry.stream

    async def _read_streamed(
        self, entry: CacheEntry, stream: Stream, offset: int, end: int, *, sequential: bool
    ) -> bytes | memoryview | None:
        """Serve `[offset, end)` from memory parts, or None for the cache-file path."""
        indices = stream.index_range(offset, end)
        parts = [stream.parts.get(i) for i in indices]
        if None in parts:
            if not sequential:
                return None
            if not entry.uncovered(offset, end):
                # The cache file has, or is getting, these bytes (a first read); what
                # follows them comes through the stream.
                gaps = entry.uncovered(end, entry.remote_size)
                if gaps:
                    first = gaps[0][0] // stream.part_size
                    self._stream_ahead(entry, stream, first, reader=first)
                return None
            for i, part in zip(indices, parts, strict=True):
                if part is None and self._start_part(entry, stream, i, indices[0]) is None:
                    return None  # no buffer free: other streams hold them all
            parts = [stream.parts[i] for i in indices]
        self._stream_ahead(entry, stream, indices[-1] + 1, reader=indices[0])
        ready = [p for p in parts if p is not None]
        for part in ready:
            await part.wait_for(min(end, part.end))
        # Checked only after the last await: a part dropped meanwhile may have lent its
        # buffer to another GET already.
        for part in ready:
            if part.ready < min(end, part.end) - part.start:  # the GET ended short
                raise _fetch_error(entry, part.error or RemoteError("streamed get ended early"))
            if part.dropped:
                return None  # a write or an eviction came first: the cache file decides
        if len(ready) == 1:
            reply: bytes | memoryview = ready[0].view(offset, end)
        else:
            reply = b"".join(p.view(max(offset, p.start), min(end, p.end)) for p in ready)
        for part in ready:
            stream.served(part, min(end, part.end) - max(offset, part.start))
        return reply

    def _stream_ahead(self, entry: CacheEntry, stream: Stream, first: int, *, reader: int) -> None:
        """Keep parts from *first* on coming, as far as free buffers allow; *reader* is the
        part being read."""
        last = min((entry.remote_size - 1) // stream.part_size, reader + stream.pool.count - 1)
        for i in range(first, last + 1):
            if i not in stream.parts and self._start_part(entry, stream, i, reader) is None:
                return

    def _start_part(
        self, entry: CacheEntry, stream: Stream, index: int, reader: int
    ) -> MemPart | None:
        part = stream.new_part(index, entry.remote_size, entry.remote_etag, reader=reader)
        if part is not None:
            assert entry.remote_key is not None
            trio.lowlevel.spawn_system_task(self._run_part, stream, part, entry.remote_key)
        return part

    async def _run_part(self, stream: Stream, part: MemPart, key: str) -> None:
        """GET one memory part; like `_run_fetch` it never raises into the loop."""
        try:
            with _get_failure_kept(part, "streamed get", key):
                log.debug("stream %s [%d, %d)", key, part.start, part.end)
                await self.store.fetch_buffer(
                    key,
                    part.start,
                    part.end,
                    memoryview(part.buf),
                    etag=part.etag,
                    progress=part.progress,
                )
                log.debug("streamed %s [%d, %d)", key, part.start, part.end)
        finally:
            stream.fetch_finished(part)

    def _read_ahead(self, entry: CacheEntry, ra: ReadAhead, pos: int) -> None:
        """Keep up to `readahead_streams` GETs of whole parts running ahead of *pos*."""
        if entry.remote_key is None:
            return
        target = min(entry.remote_size, pos + ra.window)
        part = self.part_size
        start = max(ra.ahead_end, pos) // part * part
        while start < target:
            if len(entry.fetches) >= self.readahead_streams:
                return  # the next read continues from ra.ahead_end
            end = min(start + part, entry.remote_size)
            for s, e in entry.uncovered(start, end):
                self._start_fetch(entry, s, e)
            ra.ahead_end = end
            start = end

    def _fetch_missing(self, entry: CacheEntry, start: int, end: int) -> None:
        """Start GETs for the bytes of `[start, end)` nobody has or fetches, cut at parts."""
        if entry.remote_key is None:
            return
        end = min(end, entry.remote_size)
        part = self.part_size
        for s, e in entry.uncovered(start, end):
            while s < e:
                cut = min(e, (s // part + 1) * part)
                self._start_fetch(entry, s, cut)
                s = cut

    def _start_fetch(self, entry: CacheEntry, start: int, end: int) -> None:
        fetch = Fetch(start, end)
        entry.fetches.append(fetch)
        # A system task: it outlives the request that started it (read-ahead), and
        # `_run_fetch` never raises, so it cannot take the loop down.
        trio.lowlevel.spawn_system_task(self._run_fetch, entry, fetch)

    async def _run_fetch(self, entry: CacheEntry, fetch: Fetch) -> None:
        key, etag = entry.remote_key, entry.remote_etag
        try:
            with _get_failure_kept(fetch, "fetch", key):
                if key is None:
                    raise RemoteError("nothing to fetch: the file has no object")
                log.debug("fetch %s [%d, %d)", key, fetch.start, fetch.end)
                await self.store.fetch_into(
                    key, fetch.start, fetch.end, entry.fd, [(fetch.start, fetch.end)], etag=etag
                )
                # Bytes of an older version (the ETag changed meanwhile, e.g. by an upload or
                # a chmod) are not recorded; a waiting reader fetches them again.
                if entry.remote_etag == etag and entry.remote_key == key:
                    entry.present.add(fetch.start, fetch.end)
                log.debug("fetched %s [%d, %d)", key, fetch.start, fetch.end)
        finally:
            entry.fetch_finished(fetch)

    async def _ensure(self, entry: CacheEntry, start: int, end: int) -> None:
        """Wait until `[start, end)` (clipped to the remote object) is present, fetching
        what nobody fetches. A failed GET surfaces here as an error, never as zeros."""
        for _ in range(4):
            stop = min(end, entry.remote_size)
            if start >= stop or entry.present.covers(start, stop):
                return
            self._fetch_missing(entry, start, stop)
            for fetch in entry.overlapping(start, stop):
                await fetch.done.wait()
                if fetch.error is not None:
                    raise _fetch_error(entry, fetch.error)
        raise RemoteError(f"{entry.remote_key} [{start}, {end}) could not be fetched")

    async def write(self, entry: CacheEntry, offset: int, data: bytes) -> int:
        entry.end_stream()
        async with entry.lock:
            await entry.quiesce(offset, offset + len(data))
            written = os.pwrite(entry.fd, data, offset)
            entry.present.add(offset, offset + written)
            entry.size = max(entry.size, offset + written)
            entry.dirty = True
            entry.generation += 1
            entry.last_used = time.monotonic()
        return written

    async def truncate(self, entry: CacheEntry, size: int) -> None:
        entry.end_stream()
        async with entry.lock:
            await entry.quiesce(size, max(size, entry.size, entry.remote_size) + 1)
            os.ftruncate(entry.fd, size)
            if size < entry.size:
                entry.present.clip(size)
                # Bytes past the new end must read back as zeros, never as old remote data.
                entry.remote_size = min(entry.remote_size, size)
            entry.size = size
            entry.dirty = True
            entry.generation += 1

    async def _fill(self, entry: CacheEntry, start: int, end: int) -> None:
        """Fetch every missing byte of `[start, end)`, in parallel parts."""
        if entry.remote_key is None:
            return
        await self._ensure(entry, start, end)

    async def flush(
        self, entry: CacheEntry, key: str, metadata: dict[str, str], content_type: str | None = None
    ) -> str | None:
        """Upload a dirty entry to *key*. Returns the new ETag, or None if it was clean.

        Raises `UploadFailedError` (after journaling) if S3 fails; the data stays here.
        """
        async with entry.lock:
            if not entry.dirty:
                return None
            generation = entry.generation
            try:
                await self._fill(entry, 0, entry.size)
                etag = await self.store.upload_file(
                    key, entry.fd, entry.size, metadata, content_type, self.upload
                )
            except RemoteError as exc:
                self.stats.upload_failures += 1
                entry.upload_failed = True
                self._write_journal(entry, key, metadata, content_type)
                log.error(
                    "upload of %s (%d bytes) failed, data kept in %s: %s",
                    key,
                    entry.size,
                    entry.data_path,
                    exc,
                )
                raise UploadFailedError(f"upload of {key} failed: {exc}") from exc
            entry.upload_failed = False
            self.stats.uploads += 1
            self.stats.bytes_uploaded += entry.size
            entry.remote_key = key
            entry.remote_size = entry.size
            entry.remote_etag = etag
            entry.present = Ranges()
            entry.present.add(0, entry.size)
            if entry.generation == generation:
                entry.dirty = False
                entry.journal_path.unlink(missing_ok=True)
            log.info("uploaded %s (%d bytes)", key, entry.size)
            return etag

    def _write_journal(
        self, entry: CacheEntry, key: str, metadata: dict[str, str], content_type: str | None
    ) -> None:
        """Record what the data file is for, so the data survives a crash or restart."""
        info = {
            "key": key,
            "size": entry.size,
            "metadata": metadata,
            "content_type": content_type,
            # Incomplete means some bytes were never fetched; a restart cannot upload those.
            "complete": not entry.present.missing(0, min(entry.size, entry.remote_size)),
            "written": time.time(),
        }
        try:
            os.fsync(entry.fd)
            write_atomically(entry.journal_path, json.dumps(info).encode())
        except OSError:
            log.exception("cannot write upload journal %s", entry.journal_path)

    async def upload_journaled(self, info: dict[str, object]) -> bool:
        """Retry an upload left behind by a previous run. True if it is done with."""
        data_path = Path(str(info["data_path"]))
        key = str(info["key"])
        if not info.get("complete") or not data_path.exists():
            log.error("cannot recover upload of %s from %s: data incomplete", key, data_path)
            return False
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            meta = info.get("metadata")
            metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
            ctype = info.get("content_type")
            await self.store.upload_file(
                key, fd, size, metadata, str(ctype) if ctype else None, self.upload
            )
        except RemoteError as exc:
            self.stats.upload_failures += 1
            log.warning("recovered upload of %s still failing: %s", key, exc)
            return False
        finally:
            os.close(fd)
        self.stats.uploads += 1
        self.stats.bytes_uploaded += size
        data_path.unlink(missing_ok=True)
        data_path.with_suffix(".json").unlink(missing_ok=True)
        log.info("recovered upload of %s (%d bytes) from a previous run", key, size)
        return True

    def evict(self, nodes: Iterable[Node]) -> None:
        """Drop clean, unopened entries, oldest first, until the cache fits in `max_size`.

        *nodes* are walked only when the open entries' summed size is over the limit."""
        if self.usage.bytes <= self.max_size:
            return
        candidates = []
        total = 0
        for node in nodes:
            entry = node.cache
            if entry is None:
                continue
            total += entry.size
            if not entry.dirty and node.open_handles == 0:
                candidates.append((entry.last_used, node))
        if total <= self.max_size:
            return
        for _, node in sorted(candidates, key=lambda c: c[0]):
            if total <= self.max_size:
                break
            assert node.cache is not None
            total -= node.cache.size
            node.cache.close()
            node.cache = None
