"""What one copy run shares among its parts: options, store, trees, counters and progress,
error recording and the stop flag (`RunContext`); the plan it works from (`Plan`); and the
shape of a direction's strategy (`Direction`).

The parts (planning, to-local, chunked, to-S3, mirror) get this object instead of reaching into
each other: every counter moves through one method here, under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from plugin.confined import Tree
from plugin.s3.store import ObjectInfo, ObjectStore
from plugin.staging.errors import CopyCancelledError, TransferError
from plugin.staging.localfs import Entry
from plugin.staging.locations import Location, S3Location
from plugin.staging.progress import CopyResult, FileError, ProgressTracker, TokenBucket
from plugin.staging.scheduling import AbortError, Retrier, Scheduler, SplitJob, Task

if TYPE_CHECKING:
    from plugin.staging.copyoptions import CopyOptions
    from plugin.staging.hasher import Hasher
    from plugin.staging.journal import ChunkJournal

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Target:
    """Where one source entry goes."""

    entry: Entry
    src: str  # name in the local source tree, or S3 key
    dst: str  # name in the local destination tree, or S3 key


@dataclass
class Plan:
    """The listed source and what is known of the destination before copying."""

    files: list[Target]  # files and symlinks
    dirs: list[Target]  # parents before children
    #: The source is one file named on the command line (no tree, no mirror).
    single: bool = False
    #: Destination directories created by this run: they cannot hold an up-to-date file.
    fresh_dirs: set[str] = field(default_factory=set)
    #: Objects under an S3 destination prefix, listed up front.
    dst_index: dict[str, ObjectInfo] = field(default_factory=dict)


@dataclass(eq=False)
class RunContext:
    """One copy run: its two sides, its options and what every part of the engine shares."""

    src: Location
    dst: Location
    opts: CopyOptions
    store: ObjectStore | None
    #: The S3 endpoint URL as configured ("" for the SDK default): part of a cached
    #: object's identity.
    endpoint: str = ""
    fatal: str | None = field(default=None, init=False)
    result: CopyResult = field(default_factory=CopyResult, init=False)
    scheduler: Scheduler = field(default_factory=lambda: Scheduler(()), init=False)
    #: The local side(s), opened once: every name beneath them is reached fd-relative.
    src_tree: Tree | None = field(default=None, init=False)
    dst_tree: Tree | None = field(default=None, init=False)
    #: Descriptors, hash threads and journals to release if the run stops midway.
    open_fds: set[int] = field(default_factory=set, init=False)
    hashers: set[Hasher] = field(default_factory=set, init=False)
    journals: set[ChunkJournal] = field(default_factory=set, init=False)
    _abort: threading.Event = field(default_factory=threading.Event, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        opts = self.opts
        self.cancel = opts.cancel or threading.Event()
        self.tracker = ProgressTracker(opts.progress, opts.progress_interval)
        self._bandwidth = TokenBucket(opts.bwlimit) if opts.bwlimit else None
        self.retry = Retrier(
            self.store, opts.retries, opts.retry_delay, self.cancel, self.check_stop
        )

    # -- trees ---------------------------------------------------------------------------------

    @property
    def st(self) -> Tree:
        """The local source tree (only on local-source paths)."""
        assert self.src_tree is not None
        return self.src_tree

    @property
    def dt(self) -> Tree:
        """The local destination tree (only on local-destination paths)."""
        assert self.dst_tree is not None
        return self.dst_tree

    def shown_src(self, t: Target) -> str:
        return self.src_tree.display(t.src) if self.src_tree is not None else t.src

    def shown_dst(self, t: Target) -> str:
        return self.dst_tree.display(t.dst) if self.dst_tree is not None else t.dst

    # -- stopping ------------------------------------------------------------------------------

    def stopping(self) -> bool:
        return self.cancel.is_set() or self._abort.is_set()

    def check_stop(self) -> None:
        if self.cancel.is_set():
            raise CopyCancelledError()
        if self._abort.is_set():
            raise AbortError()

    # -- accounting ----------------------------------------------------------------------------

    def record_error(self, rel: str, message: str) -> None:
        log.warning("%s: %s", rel or str(self.src), message)
        with self._lock:
            self.result.errors.append(FileError(rel or str(self.src), message))
        self.tracker.error(f"{rel}: {message}")

    def file_failed(self, t: Target, exc: BaseException) -> None:
        if isinstance(exc, CopyCancelledError | AbortError):
            return
        if isinstance(exc, TransferError) and exc.fatal:
            with self._lock:
                first = self.fatal is None
                if first:
                    self.fatal = str(exc)
            self._abort.set()
            if not first:
                return
        if isinstance(exc, OSError):
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        else:
            message = str(exc)
        with self._lock:
            self.result.files_failed += 1
        self.record_error(t.entry.rel or t.src, message)
        self.tracker.file_done()

    def file_copied(self, t: Target, check: str | None = None) -> None:
        """*check*: what verified the file ("crc64nvme", "md5", "size-only", "cache", ...)."""
        with self._lock:
            self.result.files_copied += 1
            if t.entry.kind == "symlink":
                self.result.symlinks += 1
            if check is not None:
                self.result.checks[check] = self.result.checks.get(check, 0) + 1
        if check is not None:
            self.tracker.add_check(check)
        self.tracker.file_done()

    def file_from_cache(self, t: Target, size: int) -> None:
        """A file filled from the host's object cache instead of downloaded."""
        with self._lock:
            self.result.files_from_cache += 1
            self.result.bytes_from_cache += size
        self.tracker.add_bytes(size)
        self.file_copied(t, "cache")

    def file_skipped(self, t: Target) -> None:
        with self._lock:
            self.result.files_skipped += 1
            self.result.bytes_skipped += t.entry.size
        self.tracker.add_bytes(t.entry.size)
        self.tracker.file_done()

    def moved(self, n: int) -> None:
        """Account *n* bytes moved by this run; applies the bandwidth limit and cancellation."""
        with self._lock:
            self.result.bytes_copied += n
        self.tracker.add_bytes(n)
        if self._bandwidth is not None:
            self._bandwidth.take(n, self.cancel)
        self.check_stop()

    def sent(self, n: int) -> None:
        """Account *n* bytes uploaded (the bandwidth was taken before sending)."""
        with self._lock:
            self.result.bytes_copied += n
        self.tracker.add_bytes(n)

    def throttle(self, n: int) -> None:
        """Take *n* bytes of the bandwidth limit before sending them."""
        if self._bandwidth is not None:
            self._bandwidth.take(n, self.cancel)

    def resumed(self, n: int) -> None:
        with self._lock:
            self.result.bytes_resumed += n
        self.tracker.add_bytes(n)

    def deleted(self, n: int) -> None:
        with self._lock:
            self.result.deleted += n

    # -- end -----------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release whatever a stopped run left open (hash threads, journals, descriptors)."""
        for h in list(self.hashers):
            h.stop()
        for j in list(self.journals):
            j.close()
        for fd in list(self.open_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()
        for tree in (self.src_tree, self.dst_tree):
            if tree is not None:
                tree.close()

    def close_fd(self, fd: int) -> None:
        """Close a descriptor registered in open_fds, unless cleanup already did."""
        if fd >= 0 and fd in self.open_fds:
            self.open_fds.discard(fd)
            os.close(fd)


class SplitFile(SplitJob):
    """One file of this run copied in pieces, from or into the open file *fd*."""

    def __init__(self, ctx: RunContext, t: Target, fd: int, pieces: int) -> None:
        super().__init__(ctx.check_stop, pieces)
        self.ctx = ctx
        self.t = t
        self.fd = fd


class Direction:
    """How files go one way (local to local, S3 to local, local to S3): one subclass each,
    so no step asks what kind the source or destination is."""

    def __init__(self, ctx: RunContext, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan

    def s3_side(self, loc: Location) -> tuple[str, ObjectStore]:
        """The bucket of this run's S3 side *loc*, and the store that reaches it."""
        assert isinstance(loc, S3Location) and self.ctx.store is not None
        return loc.bucket, self.ctx.store

    def workers(self) -> int:
        return max(1, self.ctx.opts.jobs)

    def prepare_dirs(self) -> None:
        """Create what must exist before files land."""

    def tasks(self) -> Iterator[Task]:
        for t in self.plan.files:
            yield self.task_for(t)

    def task_for(self, t: Target) -> Task:
        def task() -> None:
            try:
                self.ctx.check_stop()
                self.copy_one(t)
            except Exception as exc:
                self.ctx.file_failed(t, exc)

        return task

    def copy_one(self, t: Target) -> None:
        raise NotImplementedError

    def finish_dirs(self) -> None:
        """Directory metadata or markers, once the files are in."""

    def delete_extraneous(self) -> int:
        """Delete what the destination holds and the source does not; the number deleted."""
        return 0

    def finish(self) -> None:
        """Last step of a run that was not stopped (e.g. syncfs)."""


def bind(fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """fn(*args) as a thunk (for retried requests built in a loop)."""
    return lambda: fn(*args)
