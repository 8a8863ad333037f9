"""Local data cache: one sparse file per open S3 object, filled by ranged GETs on demand.

Invariants (the S3 filesystem's data path relies on them):

* A byte in `[0, size)` is valid locally iff it lies in `present` or at/after `remote_size`
  (the tail beyond the remote object is zeros or data written here). Missing bytes below
  `remote_size` are fetched from `remote_key` before they are read or uploaded.
* A dirty entry is never evicted or deleted, except when its file is unlinked. If an upload
  fails, the data stays in `<cache_dir>/<id>.data` with a `<id>.json` journal naming the key
  and metadata, so a later flush, the retry task or the next mount can upload it.
* `lock` serialises everything that changes the local file or its bookkeeping (fetch, write,
  truncate, upload). Reads of already-present bytes do not take it.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from plugin.fusefs.errors import RemoteError, UploadFailedError

if TYPE_CHECKING:
    from plugin.fusefs.inodes import Node
    from plugin.fusefs.store import ObjectStore

log = logging.getLogger(__name__)

MiB = 1 << 20

#: First read-ahead window: 1 MiB plus the kernel's own 128 KiB read-ahead, so a sequential
#: reader's second kernel request is already local (mountpoint-s3's INITIAL_REQUEST_SIZE).
INITIAL_WINDOW = MiB + 128 * 1024
MAX_FORWARD = 16 * MiB
MAX_BACKWARD = MiB


class Ranges:
    """Sorted, merged, half-open byte ranges."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __repr__(self) -> str:
        return f"Ranges({list(zip(self._starts, self._ends, strict=True))})"

    def as_list(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # First range whose end reaches start, last range whose start reaches end.
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def clip(self, limit: int) -> None:
        """Forget everything at or after *limit* (truncate)."""
        i = bisect.bisect_left(self._ends, limit)
        del self._starts[i + 1 :]
        del self._ends[i + 1 :]
        if i < len(self._starts):
            if self._starts[i] >= limit:
                del self._starts[i]
                del self._ends[i]
            else:
                self._ends[i] = limit

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """Gaps of `[start, end)` not covered by any range."""
        gaps = []
        pos = start
        i = bisect.bisect_right(self._ends, start)
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if s >= end:
                break
            if s > pos:
                gaps.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end


@dataclass
class ReadAhead:
    """Per-handle sequential detector. The window doubles on every sequential miss and falls
    back to the initial size on a seek, so random readers do not pull megabytes per 4 KiB.

    The kernel has several READs in flight (async read-ahead), so they arrive slightly out
    of order; offsets near the expected one still count as sequential (mountpoint-s3 allows
    16 MiB forward and 1 MiB backward).
    """

    max_window: int
    next_offset: int = -1
    window: int = INITIAL_WINDOW

    def _sequential(self, offset: int) -> bool:
        return self.next_offset >= 0 and (
            self.next_offset - MAX_BACKWARD <= offset <= self.next_offset + MAX_FORWARD
        )

    def window_for(self, offset: int) -> int:
        if self._sequential(offset):
            self.window = min(self.window * 2, self.max_window)
        else:
            self.window = min(INITIAL_WINDOW, self.max_window)
        return self.window

    def note_read(self, offset: int, end: int) -> None:
        self.next_offset = max(self.next_offset, end) if self._sequential(offset) else end


@dataclass(frozen=True)
class UploadConfig:
    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    concurrency: int = 4


class CacheEntry:
    """The local copy of one file's data (see the module invariants)."""

    def __init__(
        self, data_path: Path, *, remote_key: str | None, remote_size: int, remote_etag: str | None
    ) -> None:
        self.data_path = data_path
        self.journal_path = data_path.with_suffix(".json")
        self.fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.remote_key = remote_key
        self.remote_size = remote_size
        self.remote_etag = remote_etag
        self.size = remote_size
        os.ftruncate(self.fd, self.size)
        self.present = Ranges()
        self.dirty = False
        #: Bumped by every change; an upload only clears `dirty` if nothing changed meanwhile.
        self.generation = 0
        self.upload_failed = False
        self.lock = trio.Lock()
        self.last_used = time.monotonic()
        self.closed = False

    def close(self, *, keep_file: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        if not keep_file:
            for p in (self.data_path, self.journal_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


class DataCache:
    """Owns the cache directory, the entries' local files and every data transfer."""

    def __init__(
        self,
        store: ObjectStore,
        cache_dir: Path,
        *,
        max_size: int,
        readahead_max: int,
        upload: UploadConfig,
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.max_size = max_size
        self.readahead_max = readahead_max
        self.upload_config = upload
        self._lock_fd: int | None = None

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

    def new_entry(
        self, *, remote_key: str | None, remote_size: int, remote_etag: str | None
    ) -> CacheEntry:
        path = self.cache_dir / f"{uuid.uuid4().hex}.data"
        return CacheEntry(
            path, remote_key=remote_key, remote_size=remote_size, remote_etag=remote_etag
        )

    def read_ahead(self) -> ReadAhead:
        return ReadAhead(max_window=self.readahead_max)

    async def read(self, entry: CacheEntry, offset: int, size: int, ra: ReadAhead) -> bytes:
        entry.last_used = time.monotonic()
        end = min(offset + size, entry.size)
        if offset >= end:
            return b""
        need_end = min(end, entry.remote_size)
        if offset < need_end and not entry.present.covers(offset, need_end):
            window = ra.window_for(offset)
            async with entry.lock:
                await self._fill(entry, offset, max(need_end, offset + window))
        ra.note_read(offset, end)
        return os.pread(entry.fd, end - offset, offset)

    async def write(self, entry: CacheEntry, offset: int, data: bytes) -> int:
        async with entry.lock:
            written = os.pwrite(entry.fd, data, offset)
            entry.present.add(offset, offset + written)
            entry.size = max(entry.size, offset + written)
            entry.dirty = True
            entry.generation += 1
            entry.last_used = time.monotonic()
        return written

    async def truncate(self, entry: CacheEntry, size: int) -> None:
        async with entry.lock:
            os.ftruncate(entry.fd, size)
            if size < entry.size:
                entry.present.clip(size)
                # Bytes past the new end must read back as zeros, never as old remote data.
                entry.remote_size = min(entry.remote_size, size)
            entry.size = size
            entry.dirty = True
            entry.generation += 1

    async def _fill(self, entry: CacheEntry, start: int, end: int) -> None:
        """Fetch the missing bytes of `[start, end)` (clipped to the remote object) with one
        ranged GET spanning all gaps; bytes written locally meanwhile are left alone."""
        end = min(end, entry.remote_size)
        gaps = entry.present.missing(start, end)
        if not gaps or entry.remote_key is None:
            return
        lo, hi = gaps[0][0], gaps[-1][1]
        log.debug("fetch %s [%d, %d) in %d gap(s)", entry.remote_key, lo, hi, len(gaps))
        await self.store.fetch_into(
            entry.remote_key, lo, hi, entry.fd, gaps, etag=entry.remote_etag
        )
        for s, e in gaps:
            entry.present.add(s, e)

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
                    key, entry.fd, entry.size, metadata, content_type, self.upload_config
                )
            except RemoteError as exc:
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
        tmp = entry.journal_path.with_suffix(".json.tmp")
        try:
            os.fsync(entry.fd)
            tmp.write_text(json.dumps(info))
            os.replace(tmp, entry.journal_path)
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
                key, fd, size, metadata, str(ctype) if ctype else None, self.upload_config
            )
        except RemoteError as exc:
            log.warning("recovered upload of %s still failing: %s", key, exc)
            return False
        finally:
            os.close(fd)
        data_path.unlink(missing_ok=True)
        data_path.with_suffix(".json").unlink(missing_ok=True)
        log.info("recovered upload of %s (%d bytes) from a previous run", key, size)
        return True

    def evict(self, nodes: Iterable[Node]) -> None:
        """Drop clean, unopened entries, oldest first, until the cache fits in `max_size`."""
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
