"""Small objects whole, in one GET each, and fetched ahead of a reader going through a
directory in name order.

Why: a cold 64 KiB read through the cache file costs a HEAD at LOOKUP, then a boto3 ranged
GET written into the cache file and read back from it: about 4 ms per file on the 2-core
bench machine, against 0.6 ms for the same GET on the wire (docs/benchmarks.md, FUSE
section). Here an object up to `SMALL_OBJECT_MAX` is fetched whole with one GET into memory
and READ replies are slices of it, with no cache file involved. When a reader goes through a
directory in name order (`cp -r`, `tar`, a loop over `f0000..f0999`), the next objects of the
directory's listing are fetched ahead, pipelined on one connection: a GET answers with the
user metadata a HEAD would, so their LOOKUPs need no HEAD and their READs no GET.

Consistency: an object fetched ahead is used only while its attributes would be trusted
anyway (`metadata_ttl`), and only for the ETag its LOOKUP handed out; a written file never
takes this path (its bytes live in the cache file).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from plugin.fusefs.errors import FsError
from plugin.fusefs.store import ObjectInfo, ObjectStore
from plugin.s3.errors import FastPathError

log = logging.getLogger(__name__)

#: Objects up to this size are read whole in one GET (and may be fetched ahead).
SMALL_OBJECT_MAX = 256 * 1024
#: Objects fetched ahead of an in-order reader, at most.
PREFETCH_AHEAD = 32
#: Bytes held by objects fetched ahead and not read yet, at most.
PREFETCH_BYTES = 8 << 20
#: Whole reads in increasing name order in one directory before fetching ahead starts.
IN_ORDER_READS = 2
#: Worker threads for whole GETs (each holds one kept-alive connection).
WHOLE_GET_THREADS = 4


@dataclass
class _Fetched:
    info: ObjectInfo
    body: bytes
    at: float


@dataclass
class _DirReader:
    """Where an in-order reader is in one directory, and that directory's listing."""

    last: str = ""
    run: int = 0
    listing: list[ObjectInfo] = field(default_factory=list)
    token: str | None = None
    listed: bool = False
    busy: bool = False


class SmallObjects:
    """Whole small objects for READ and LOOKUP; see the module docstring."""

    def __init__(self, store: ObjectStore, ttl: float, *, max_size: int = SMALL_OBJECT_MAX) -> None:
        self.store = store
        self.ttl = ttl
        self.max_size = max_size
        self._ready: dict[str, _Fetched] = {}
        self._ready_bytes = 0
        #: key -> set when the batch fetching it ahead has answered (or failed).
        self._pending: dict[str, trio.Event] = {}
        self._dirs: dict[str, _DirReader] = {}
        self._limiter = trio.CapacityLimiter(WHOLE_GET_THREADS)
        #: Counters (tests and diagnostics): whole GETs made for a READ, objects fetched
        #: ahead, and fetched-ahead objects that answered a LOOKUP or a READ.
        self.whole_gets = 0
        self.fetched_ahead = 0
        self.lookups_answered = 0
        self.reads_answered = 0

    def wanted(self, size: int) -> bool:
        return 0 < size <= self.max_size

    # -- fetched ahead ----------------------------------------------------------------------

    def _fresh(self, key: str) -> _Fetched | None:
        got = self._ready.get(key)
        if got is not None and time.monotonic() - got.at >= self.ttl:
            self._drop(key)
            return None
        return got

    def _drop(self, key: str) -> None:
        got = self._ready.pop(key, None)
        if got is not None:
            self._ready_bytes -= len(got.body)

    def info(self, key: str) -> ObjectInfo | None:
        """The attributes of *key* as its fetched-ahead GET answered them (a LOOKUP without
        a HEAD), or None."""
        got = self._fresh(key)
        if got is None:
            return None
        self.lookups_answered += 1
        return got.info

    async def lookup_info(self, key: str) -> ObjectInfo | None:
        """Like `info`, but a LOOKUP of a key whose fetch-ahead GET is on the wire waits for
        that answer rather than sending a HEAD of its own."""
        pending = self._pending.get(key)
        if pending is not None:
            await pending.wait()
        return self.info(key)

    def forget(self, key: str) -> None:
        """*key* was written, deleted or renamed here: what was fetched of it is stale."""
        self._drop(key)

    def take(self, key: str, etag: str | None) -> bytes | None:
        """The fetched-ahead body of *key* if it is the version *etag*; it is handed over
        (the caller keeps it for the open file), so its memory leaves the budget."""
        got = self._fresh(key)
        if got is None:
            return None
        self._drop(key)
        if etag is not None and got.info.etag != etag:
            return None
        self.reads_answered += 1
        return got.body

    # -- one whole GET ----------------------------------------------------------------------

    async def get(self, key: str, size: int, etag: str | None) -> bytes:
        """*key* whole (*size* bytes, version *etag*) in one GET, straight into memory."""
        self.whole_gets += 1
        buf = bytearray(size)
        view = memoryview(buf)
        fast = self.store.fast_client
        if fast is not None and fast.enabled:
            try:
                await trio.to_thread.run_sync(
                    fast.get_range_into, key, 0, view, etag, limiter=self._limiter
                )
                return bytes(buf)
            except FastPathError as exc:
                log.debug("fast whole GET %s: %s; asking boto3", key, exc)
        # Raises StaleError if the object changed since *etag*, like every other GET.
        await self.store.fetch_buffer(key, 0, size, view, etag=etag)
        return bytes(buf)

    # -- reading a directory in order -------------------------------------------------------

    def note_read(self, key: str) -> None:
        """A whole read of *key*: if its directory is being read in name order, fetch the
        next objects of its listing ahead (in the background; never fails the READ)."""
        dir_key, _, name = key.rpartition("/")
        dir_key = dir_key + "/" if dir_key else ""
        reader = self._dirs.get(dir_key)
        if reader is None:
            if len(self._dirs) >= 64:
                self._dirs.pop(next(iter(self._dirs)))
            reader = self._dirs[dir_key] = _DirReader()
        if name > reader.last:
            reader.run += 1
        else:  # started over: what was listed before this name is needed again
            reader.run = 1
            if not reader.busy:
                reader.listing, reader.token, reader.listed = [], None, False
        reader.last = name
        if reader.run >= IN_ORDER_READS and not reader.busy:
            reader.busy = True
            trio.lowlevel.spawn_system_task(self._fetch_ahead, dir_key, reader)

    async def _fetch_ahead(self, dir_key: str, reader: _DirReader) -> None:
        try:
            while True:
                keys = await self._next_keys(dir_key, reader)
                if not keys:
                    return
                await self._fetch_many(keys)
                # The reader may have moved on while these were fetched: go on with it.
        except FsError as exc:
            log.debug("fetching ahead in %s stopped: %s", dir_key, exc)
        except Exception:
            log.exception("fetching ahead in %s failed", dir_key)
        finally:
            reader.busy = False

    async def _next_keys(self, dir_key: str, reader: _DirReader) -> list[str]:
        """The keys after the reader's position worth fetching now (listing as needed)."""
        # The listing only picks what to fetch (a GET answers with the object as it is now,
        # a deleted one with 404): it need not be fresh.
        now = time.monotonic()
        for key in [k for k, v in self._ready.items() if now - v.at >= self.ttl]:
            self._drop(key)
        position = dir_key + reader.last
        while True:
            # What lies behind the reader is not needed again (a huge directory is never
            # held whole): a reader that starts over starts a new listing.
            del reader.listing[: bisect.bisect_right([o.key for o in reader.listing], position)]
            ahead = reader.listing[:PREFETCH_AHEAD]
            if len(ahead) == PREFETCH_AHEAD or (reader.listed and reader.token is None):
                break
            page = await self.store.list_page(dir_key, reader.token if reader.listed else None)
            reader.listed = True
            reader.listing.extend(page.files)
            reader.token = page.next_token
        budget = PREFETCH_BYTES - self._ready_bytes
        keys = []
        for info in ahead:
            if info.key in self._ready or info.key in self._pending:
                continue
            if not self.wanted(info.size) or info.size > budget:
                continue
            budget -= info.size
            keys.append(info.key)
        return keys

    async def _fetch_many(self, keys: list[str]) -> None:
        fast = self.store.fast_client
        if fast is None or not fast.enabled:
            return  # fetching ahead needs pipelined GETs; whole reads go on without it
        answered = trio.Event()
        self._pending.update(dict.fromkeys(keys, answered))
        try:
            answers = await trio.to_thread.run_sync(
                fast.get_many, keys, self.max_size, limiter=self._limiter
            )
            self._keep(keys, answers)
        finally:
            # LOOKUPs waiting for these keys (lookup_info) find them in `_ready` now.
            for key in keys:
                self._pending.pop(key, None)
            answered.set()
        log.debug("fetched ahead %d objects, first %s", len(keys), keys[0])

    def _keep(self, keys: list[str], answers: list[Any]) -> None:
        now = time.monotonic()
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, FastPathError):
                continue
            status, headers, body = answer
            info = self.store.info_from_headers(key, status, headers)
            if info is None or info.size != len(body):
                continue
            self._drop(key)
            self._ready[key] = _Fetched(info, body, now)
            self._ready_bytes += len(body)
            self.fetched_ahead += 1
