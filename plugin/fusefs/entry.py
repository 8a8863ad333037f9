"""One cached file: its sparse data file, which byte ranges are present, and the ranged
GETs writing into it. The invariants are in cache.py's module doc; `DataCache` there is the
only writer. Kept apart so the inode table can name a node's entry without importing the
cache (no import circle)."""

from __future__ import annotations

import bisect
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from plugin.fusefs.stream import Stream


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
class CacheUsage:
    """The summed size of all open cache entries, which eviction compares with the cache's
    limit. Entries keep it as they grow, shrink and close, so closing a file does not walk
    every cached entry (a create burst of N files would cost O(N^2))."""

    bytes: int = 0


@dataclass(eq=False)
class Fetch:
    """One ranged GET in flight into a cache file; `error` is set if it failed."""

    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class CacheEntry:
    """The local copy of one file's data (see the module invariants)."""

    def __init__(
        self,
        data_path: Path,
        *,
        remote_key: str | None,
        remote_size: int,
        remote_etag: str | None,
        usage: CacheUsage | None = None,
    ) -> None:
        self.data_path = data_path
        self._usage = usage if usage is not None else CacheUsage()
        self._size = 0
        self.closed = False
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
        #: Ranged GETs writing into `fd` right now (a handful at most).
        self.fetches: list[Fetch] = []
        #: Memory parts of a sequential reader (see stream.py); None when not streaming.
        self.stream: Stream | None = None

    @property
    def size(self) -> int:
        """The file's current length here (written or truncated; the remote size until
        then)."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if not self.closed:
            self._usage.bytes += value - self._size
        self._size = value

    def end_stream(self) -> None:
        if self.stream is not None:
            self.stream.drop_all()
            self.stream.pool.trim()
            self.stream = None

    def close(self, *, keep_file: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._usage.bytes -= self._size
        self.end_stream()
        if not keep_file:
            for p in (self.data_path, self.journal_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if not self.fetches:
            self._close_fd()
        # else: the last fetch closes it; a reused fd number would get its bytes otherwise.

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fetch_finished(self, fetch: Fetch) -> None:
        self.fetches.remove(fetch)
        fetch.done.set()
        if self.closed and not self.fetches:
            self._close_fd()

    def overlapping(self, start: int, end: int) -> list[Fetch]:
        return [f for f in self.fetches if f.start < end and f.end > start]

    def uncovered(self, start: int, end: int) -> list[tuple[int, int]]:
        """Gaps of `[start, end)` neither present nor being fetched."""
        gaps = self.present.missing(start, end)
        for f in self.fetches:
            if not gaps:
                break
            out = []
            for s, e in gaps:
                if f.end <= s or f.start >= e:
                    out.append((s, e))
                    continue
                if s < f.start:
                    out.append((s, f.start))
                if f.end < e:
                    out.append((f.end, e))
            gaps = out
        return gaps

    async def quiesce(self, start: int, end: int) -> None:
        """Wait until no fetch writes into `[start, end)`. The caller must not await between
        this and its own change of those bytes."""
        while True:
            busy = self.overlapping(start, end)
            if not busy:
                return
            await busy[0].done.wait()
