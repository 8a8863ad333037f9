"""Streamed reads: sequential readers of unchanged objects are served from memory parts.

A cold sequential read through the cache file costs a pwrite into the page cache, a pread
back out and a gigabyte of fresh page-cache memory per gigabyte read; on a small VM that
is most of the time a read takes. A stream instead GETs aligned parts into a few reused
buffers and answers READs with views into them, so the bytes go socket -> buffer ->
/dev/fuse. Streamed bytes are not kept: the kernel's page cache serves re-reads, and a
random read, a write or anything a stream cannot serve goes through the cache file.

Invariants (`DataCache` relies on them):

* A part holds bytes of `[start, end)` of the object version named by its `etag`. Its first
  `ready` bytes are in place and may be served while the GET still fills the rest; bytes
  past `ready` never are.
* A buffer belongs to at most one part. It returns to the pool when its part is dropped
  and its GET has finished, never while a worker thread may still write into it.
* Buffers are handed out and recycled only by code on the trio loop. pyfuse3 copies a READ
  reply into the kernel before the replying task yields, so recycling a served part's
  buffer in the same request cannot change the bytes of a reply.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

MiB = 1 << 20

#: Bytes per streamed GET. 16 MiB keeps botocore's per-request CPU low (1 GiB from a
#: loopback server: 0.56 s with 8 parallel 16 MiB GETs, 0.76 s with 8 MiB, 1.0 s with 4 MiB).
STREAM_PART = 16 * MiB
#: Buffers per mount, shared by every stream: the memory a mount spends on streamed reads.
STREAM_BUFFERS = 8
#: Arriving bytes are handed to waiting readers in steps of this much, when the GET
#: reports progress in pieces (boto3's read()); a body read straight from the socket
#: arrives in one piece (waking the loop per MiB cost more than it saved).
ARRIVAL_STEP = MiB


class BufferPool:
    """At most `count` buffers of `size` bytes. Freed buffers are kept for reuse (reused
    memory is already mapped, new memory must be faulted in) until `trim` gives them back."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.count = count
        self.in_use = 0
        self._free: list[mmap.mmap] = []
        self._trim_pending = False

    def take(self) -> mmap.mmap | None:
        if self._free:
            self.in_use += 1
            return self._free.pop()
        if self.in_use >= self.count:
            return None
        self.in_use += 1
        # Not bytearray(size): that zero-fills 16 MiB on the loop thread. Anonymous pages
        # are faulted in by the worker thread's recv instead, and unmapped on trim.
        return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        self.in_use -= 1
        self._free.append(buf)
        if self._trim_pending and self.in_use == 0:
            self.trim()

    def trim(self) -> None:
        """Return idle buffers' memory to the system once no stream uses any (now, or when
        the last GET still filling a dropped part returns its buffer)."""
        self._trim_pending = self.in_use > 0
        if not self._trim_pending:
            self._free.clear()


@dataclass(eq=False)
class MemPart:
    """One aligned part of the object, in a pool buffer, filled by a worker thread."""

    index: int
    start: int
    end: int
    buf: mmap.mmap
    etag: str | None
    done: trio.Event = field(default_factory=trio.Event, init=False)
    error: Exception | None = field(default=None, init=False)
    #: Bytes at the start of the buffer known to be in place (loop side).
    ready: int = field(default=0, init=False)
    served: int = field(default=0, init=False)
    dropped: bool = field(default=False, init=False)
    #: `arrivals[i]` is set once `ready` covers step i (or the GET ended, either way).
    arrivals: list[trio.Event] = field(init=False)
    _token: trio.lowlevel.TrioToken = field(init=False)
    _reported: int = field(default=0, init=False)  # worker-thread side

    def __post_init__(self) -> None:
        steps = -(-(self.end - self.start) // ARRIVAL_STEP)
        self.arrivals = [trio.Event() for _ in range(steps)]
        self._token = trio.lowlevel.current_trio_token()

    def view(self, start: int, end: int) -> memoryview:
        return memoryview(self.buf)[start - self.start : end - self.start]

    def progress(self, filled: int) -> None:
        """Worker thread: *filled* bytes are in place; wake readers at each new step."""
        step = filled if filled == self.end - self.start else filled // ARRIVAL_STEP * ARRIVAL_STEP
        if step > self._reported:
            self._reported = step
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._arrived, step)

    def _arrived(self, ready: int) -> None:
        if ready <= self.ready:
            return
        self.ready = ready
        whole = len(self.arrivals) if ready == self.end - self.start else ready // ARRIVAL_STEP
        for event in self.arrivals[:whole]:
            event.set()

    def finished(self) -> None:
        """Loop side, after the GET: wake every reader; `ready` and `error` tell them more."""
        if self.error is None:
            self._arrived(self.end - self.start)
        self.done.set()
        for event in self.arrivals:
            event.set()

    async def wait_for(self, end: int) -> None:
        """Until the object's bytes up to *end* are in place or the GET ended."""
        need = end - self.start
        if self.ready < need and not self.done.is_set():
            await self.arrivals[(need - 1) // ARRIVAL_STEP].wait()


class Stream:
    """The memory parts of one cache entry, by part index."""

    def __init__(self, pool: BufferPool, part_size: int) -> None:
        self.pool = pool
        self.part_size = part_size
        self.parts: dict[int, MemPart] = {}

    def index_range(self, start: int, end: int) -> range:
        return range(start // self.part_size, (end - 1) // self.part_size + 1)

    def new_part(
        self, index: int, object_size: int, etag: str | None, *, reader: int
    ) -> MemPart | None:
        """A part for *index*, or None if every buffer is busy. *reader* is the first part
        the current READ needs: finished parts before it may be recycled."""
        buf = self.pool.take() or self._reclaim_behind(reader)
        if buf is None:
            return None
        start = index * self.part_size
        part = MemPart(index, start, min(start + self.part_size, object_size), buf, etag)
        self.parts[index] = part
        return part

    def _reclaim_behind(self, index: int) -> mmap.mmap | None:
        """The buffer of a finished part behind *index*: a reader skipped some of its bytes."""
        for i in sorted(self.parts):
            if i >= index:
                break
            part = self.parts[i]
            if part.done.is_set():
                del self.parts[i]
                part.dropped = True
                return part.buf
        return None

    def served(self, part: MemPart, nbytes: int) -> None:
        """Count bytes handed to the kernel; a fully read part frees its buffer."""
        part.served += nbytes
        if part.served >= part.end - part.start:
            self.drop(part)

    def drop(self, part: MemPart) -> None:
        if part.dropped:
            return
        part.dropped = True
        if self.parts.get(part.index) is part:
            del self.parts[part.index]
        if part.done.is_set():
            self.pool.give(part.buf)
        # else: the GET still writes into the buffer; `fetch_finished` gives it back.

    def fetch_finished(self, part: MemPart) -> None:
        part.finished()
        if part.dropped:
            self.pool.give(part.buf)
        elif part.error is not None:
            # Readers waiting now see the error; a later read starts a new GET.
            self.drop(part)

    def drop_all(self) -> None:
        for part in list(self.parts.values()):
            self.drop(part)
