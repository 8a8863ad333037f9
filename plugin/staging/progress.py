"""Progress accounting, the bandwidth limiter and the copy result.

Progress snapshots are what `docker volume inspect` will show for a staging volume, so they carry
plain numbers (no objects) and are cheap to take from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from plugin.units import format_bytes


@dataclass(frozen=True)
class Progress:
    state: str  # "scanning" | "copying" | "done" | "failed" | "cancelled"
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    #: Bytes per second over the last few seconds.
    rate: float
    #: Seconds left at the current rate, None while unknown.
    eta: float | None
    last_error: str | None
    elapsed: float
    #: Files verified so far, by check: "crc64nvme", "crc32c", "crc32" (the store's CRC,
    #: computed per chunk), "md5" (ETag or multipart ETag), "size-only" (nothing else offered,
    #: verification off, or a local copy), "cache" (filled from the host's object cache, which
    #: holds only downloads verified by one of the checks above).
    checks: Mapping[str, int] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class FileError:
    path: str
    message: str


@dataclass
class CopyResult:
    """What a copy did. `ok` is False if any file failed or the copy was cancelled."""

    state: str = "done"
    files_total: int = 0
    files_copied: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_total: int = 0
    #: Bytes actually moved by this run.
    bytes_copied: int = 0
    #: Bytes of unchanged files that were not copied.
    bytes_skipped: int = 0
    #: Bytes of chunks/parts finished by an earlier, interrupted run and reused.
    bytes_resumed: int = 0
    elapsed: float = 0.0
    errors: list[FileError] = field(default_factory=list)
    #: Files copied by this run, by the check that verified them (see Progress.checks;
    #: "cache" for files filled from the host's object cache).
    checks: dict[str, int] = field(default_factory=dict)
    #: Files (and their bytes) filled from the host's object cache instead of downloaded;
    #: they count as copied, their bytes not as moved.
    files_from_cache: int = 0
    bytes_from_cache: int = 0
    #: Entries the mirror step deleted from the destination (`delete_extraneous`).
    deleted: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "done" and not self.errors

    def summary(self) -> str:
        rate = self.bytes_copied / self.elapsed / 2**20 if self.elapsed > 0 else 0.0
        text = (
            f"{self.state}: {self.files_copied} copied, {self.files_skipped} unchanged, "
            f"{self.files_failed} failed of {self.files_total} files; "
            f"{format_bytes(self.bytes_copied)} moved"
        )
        if self.bytes_resumed:
            text += f" ({format_bytes(self.bytes_resumed)} reused from an interrupted run)"
        if self.files_from_cache:
            text += (
                f", {self.files_from_cache} files ({format_bytes(self.bytes_from_cache)}) "
                "from the host cache"
            )
        text += f" in {self.elapsed:.1f}s ({rate:.1f} MiB/s)"
        if self.deleted:
            text += f"; {self.deleted} deleted from the destination (not in the source)"
        return text

    def checks_text(self) -> str:
        """Which check verified how many files, e.g. "crc64nvme 1, md5 3" ("none")."""
        return checks_text(self.checks)


def checks_text(checks: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(checks.items())) or "none"


class ProgressTracker:
    """Thread-safe counters; calls the user's callback at most every *interval* seconds."""

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.5) -> None:
        self._cb = callback
        self._interval = interval
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_emit = 0.0
        self._samples: list[tuple[float, int]] = [(self._start, 0)]
        self.state = "scanning"
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0
        self.last_error: str | None = None
        self.checks: dict[str, int] = {}

    def add_check(self, kind: str) -> None:
        with self._lock:
            self.checks[kind] = self.checks.get(kind, 0) + 1

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
        self.maybe_emit()

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
        self.maybe_emit()

    def error(self, message: str) -> None:
        with self._lock:
            self.last_error = message
        self.maybe_emit()

    def snapshot(self) -> Progress:
        with self._lock:
            now = time.monotonic()
            self._samples.append((now, self.bytes_done))
            while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
                self._samples.pop(0)
            t0, b0 = self._samples[0]
            rate = (self.bytes_done - b0) / (now - t0) if now > t0 else 0.0
            left = max(self.bytes_total - self.bytes_done, 0)
            eta = left / rate if rate > 0 else (0.0 if left == 0 else None)
            return Progress(
                state=self.state,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                files_done=self.files_done,
                files_total=self.files_total,
                rate=rate,
                eta=eta,
                last_error=self.last_error,
                elapsed=now - self._start,
                checks=dict(self.checks),
            )

    def maybe_emit(self, force: bool = False) -> None:
        if self._cb is None:
            return
        now = time.monotonic()
        if not force and now - self._last_emit < self._interval:
            return
        self._last_emit = now
        self._cb(self.snapshot())


class TokenBucket:
    """Shared bandwidth limit: callers take tokens for the bytes they moved and sleep when the
    bucket is empty. The burst is a tenth of a second of traffic, so the limit holds even for
    short copies, and at least one step, so a single large step cannot wait forever."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.capacity = burst if burst is not None else max(rate / 10, 64 * 1024)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int, cancel: threading.Event | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            if cancel is not None:
                cancel.wait(wait)
            else:
                time.sleep(wait)
