"""How the work of a copy runs: the worker pool, the scheduler that feeds it, split files'
pieces, and the retry rules for S3 requests.

Shape (s3ql's ParallelPipeline): `jobs` workers pull work from one scheduler. A large file
becomes one task per chunk; workers prefer pending chunks over starting new files, so few large
files are open at a time and memory stays at about `jobs` x one buffer whatever the data size.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from plugin.s3.store import ObjectStore
from plugin.staging.errors import CopyCancelledError, StagingError, TransferError

log = logging.getLogger(__name__)

T = TypeVar("T")

Task = Callable[[], None]


class AbortError(Exception):
    """Internal: stop this file quietly because the whole copy stops."""


class Scheduler:
    """Hands out work: pending chunks of files already started first, then new files.

    A worker with nothing to do waits while other tasks are running, because a running task
    may be a large file about to push its chunks; only when nothing is queued, the file list
    is exhausted and no task runs is the work over.
    """

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._cond = threading.Condition()
        self._chunks: deque[Task] = deque()
        self._tasks = iter(tasks)
        self._exhausted = False
        self._active = 0

    def push(self, chunk_tasks: Iterable[Task]) -> None:
        with self._cond:
            self._chunks.extend(chunk_tasks)
            self._cond.notify_all()

    def next(self, stopping: Callable[[], bool]) -> Task | None:
        """The next task (the caller must call done() after it), or None when all is done."""
        with self._cond:
            while not stopping():
                task: Task | None = None
                if self._chunks:
                    task = self._chunks.popleft()
                elif not self._exhausted:
                    task = next(self._tasks, None)
                    self._exhausted = task is None
                if task is not None:
                    self._active += 1
                    return task
                if self._active == 0:
                    self._cond.notify_all()
                    return None
                self._cond.wait(0.2)
            return None

    def done(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()


def run_workers(
    scheduler: Scheduler,
    n: int,
    stopping: Callable[[], bool],
    tick: Callable[[], None],
    every: float,
) -> None:
    """Run *n* worker threads over *scheduler* until the work is done or *stopping*; *tick*
    runs every *every* seconds meanwhile (progress reports)."""

    def worker() -> None:
        while True:
            task = scheduler.next(stopping)
            if task is None:
                return
            try:
                task()
            finally:
                scheduler.done()

    threads = [
        threading.Thread(target=worker, name=f"stowage-copy-{i}", daemon=True) for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(every)
            tick()


class SplitJob:
    """A file copied in pieces (chunks or parts) by several workers: the first error wins and
    later pieces are skipped; whichever piece ends last (failed or not) calls finish()."""

    def __init__(self, check_stop: Callable[[], None], pieces: int) -> None:
        self.check_stop = check_stop
        self.remaining = pieces
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def piece(self, fn: Callable[[int], None], n: int) -> Task:
        return lambda: self._run_piece(fn, n)

    def _run_piece(self, fn: Callable[[int], None], n: int) -> None:
        try:
            if self.error is None:
                self.check_stop()
                fn(n)
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.finish()

    def finish(self) -> None:
        raise NotImplementedError


@dataclass
class Retrier:
    """Runs S3 requests with the engine's retry rules: transient failures are retried with
    exponential backoff and jitter; an unreachable endpoint ends as a fatal TransferError
    that stops the whole copy."""

    store: ObjectStore | None
    retries: int
    delay: float
    cancel: threading.Event
    check_stop: Callable[[], None]

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        """Run *fn*, retrying transient S3 failures with exponential backoff and jitter."""
        assert self.store is not None
        attempt = 0
        while True:
            self.check_stop()
            try:
                return fn()
            except (StagingError, AbortError):
                raise
            except Exception as exc:
                transient = self.store.is_transient(exc)
                if not transient or attempt >= self.retries:
                    raise self._transfer_error(what, exc, attempt + 1, transient) from exc
                delay = min(self.delay * 2**attempt, 10.0) * (0.5 + random.random())
                attempt += 1
                log.info(
                    "%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt, self.retries, delay
                )
                if self.cancel.wait(delay):
                    raise CopyCancelledError() from exc

    def _transfer_error(
        self, what: str, exc: BaseException, attempts: int, transient: bool
    ) -> TransferError:
        assert self.store is not None
        unreachable = self.store.is_unreachable(exc)
        if unreachable:
            hint = (
                f"cannot reach the S3 endpoint {self.store.endpoint}: check that it is up and "
                "that --endpoint is right; finished chunks are kept and a rerun resumes"
            )
        elif transient:
            hint = "the S3 endpoint kept failing; rerun later to resume"
        else:
            hint = "check the bucket name, the prefix and the credentials' permissions"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return TransferError(f"{what} failed{tries}: {exc} ({hint})", fatal=unreachable)
