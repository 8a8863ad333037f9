"""What is known of a staged volume's jobs: the persisted record (`staging.json` beside the
volume's data) and the in-memory handles of its running threads.

Why persisted: a restarted daemon resumes what was running and still refuses to Remove a
volume whose stage-out has not finished. The record is replaced atomically after every state
change and every few seconds of progress, so a crash leaves the old or the new one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from plugin.atomic import write_atomically
from plugin.backends.staged.options import StagingConfig
from plugin.staging.progress import CopyResult, Progress
from plugin.units import format_bytes

log = logging.getLogger(__name__)

STATE_FILE = "staging.json"
#: Progress is persisted at most this often (state changes are persisted at once).
PERSIST_INTERVAL_S = 2.0


def now() -> str:
    """UTC, to the second, as `docker volume inspect` shows it."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class JobState:
    """One direction's progress, as persisted and shown in `docker volume inspect`."""

    state: str = "none"  # none | pending | running | done | failed
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    rate: float = 0.0
    eta: float | None = None
    last_error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    #: Files verified by each check ("crc64nvme", "crc32c", "crc32", "md5", "size-only").
    checks: dict[str, int] = field(default_factory=dict)
    #: Of the last run: what the host's stage-in cache (`--stage-cache`) supplied.
    files_from_cache: int = 0
    bytes_from_cache: int = 0
    #: Of the last run: files, links and directories deleted because the source lacks them.
    deleted: int = 0

    def progress_text(self) -> str:
        text = (
            f"{format_bytes(self.bytes_done)} of {format_bytes(self.bytes_total)}, "
            f"{self.files_done} of {self.files_total} files"
        )
        if self.state == "running":
            text += f", {format_bytes(self.rate)}/s"
            text += f", ETA {self.eta:.0f} s" if self.eta is not None else ", ETA unknown"
        return text

    def update(self, p: Progress) -> None:
        self.bytes_done, self.bytes_total = p.bytes_done, p.bytes_total
        self.files_done, self.files_total = p.files_done, p.files_total
        self.rate, self.eta = round(p.rate, 1), None if p.eta is None else round(p.eta, 1)
        self.checks = dict(p.checks)

    def finish(self, result: CopyResult) -> None:
        """Final numbers from the copy's result. Only a successful copy is all done: after a
        failure (or a cancelled copy) the files counted are those copied or found unchanged,
        and the bytes those moved, reused or unchanged, which is what a retry will not redo."""
        self.bytes_total, self.files_total = result.bytes_total, result.files_total
        self.checks = dict(result.checks)
        self.files_from_cache = result.files_from_cache
        self.bytes_from_cache = result.bytes_from_cache
        self.deleted = result.deleted
        if result.ok:
            self.bytes_done, self.files_done = result.bytes_total, result.files_total
        else:
            moved = result.bytes_copied + result.bytes_resumed + result.bytes_skipped
            self.bytes_done = min(moved, result.bytes_total)
            self.files_done = result.files_copied + result.files_skipped
        self.rate = 0.0
        self.eta = 0.0 if result.ok else None
        self.finished_at = now()


@dataclass
class PersistedStaging:
    stage_in: JobState = field(default_factory=JobState)
    stage_out: JobState = field(default_factory=JobState)
    #: Stage-in succeeded at least once (policy once: never again).
    stage_in_completed: bool = False
    #: Stage-in succeeded since the volume was last unmounted (policy always).
    stage_in_fresh: bool = False
    stage_in_source_empty: bool = False
    last_stage_out: str | None = None
    #: The next stage-in makes the volume an exact copy of the source (files the source no
    #: longer has are deleted here): set when another host held the volume since, and this
    #: host has nothing of its own left to upload.
    stage_in_replaces: bool = False

    @classmethod
    def load(cls, path: Path) -> PersistedStaging:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("unreadable staging state %s (%s); starting afresh", path, exc)
            return cls()
        names = {f.name for f in fields(JobState)}

        def job(key: str) -> JobState:
            return JobState(**{k: v for k, v in raw.get(key, {}).items() if k in names})

        return cls(
            stage_in=job("stage_in"),
            stage_out=job("stage_out"),
            stage_in_completed=bool(raw.get("stage_in_completed")),
            stage_in_fresh=bool(raw.get("stage_in_fresh")),
            stage_in_source_empty=bool(raw.get("stage_in_source_empty")),
            last_stage_out=raw.get("last_stage_out"),
            stage_in_replaces=bool(raw.get("stage_in_replaces")),
        )


class StagedVolume:
    """In-memory staging of one volume; `lock` guards `state` and the job handles."""

    def __init__(self, name: str, config: StagingConfig, data: Path, state_file: Path) -> None:
        self.name = name
        self.config = config
        self.data = data
        self.state_file = state_file
        self.lock = threading.Lock()
        self.state = PersistedStaging.load(state_file)
        self.mounted = False
        self.in_thread: threading.Thread | None = None
        self.in_done = threading.Event()
        self.out_thread: threading.Thread | None = None
        self.out_rerun = False
        self.cancel = threading.Event()  # set by Remove: stop every job of this volume
        self.last_persist = 0.0
        #: `dir_markers=auto` as the stage-out server answered, asked once per daemon run
        #: (the probe costs four requests; a server does not change its mind between runs).
        self.probed_markers: bool | None = None

    def stage_in_running(self) -> bool:
        """The job's outcome is not recorded yet (its thread may linger a moment after)."""
        return self.in_thread is not None and not self.in_done.is_set()

    def stage_out_running(self) -> bool:
        return self.out_thread is not None and self.out_thread.is_alive()

    def persist(self) -> None:
        """Caller holds `lock`."""
        self.last_persist = time.monotonic()
        payload = json.dumps(asdict(self.state), indent=1).encode()
        try:
            write_atomically(self.state_file, payload)
        except OSError as exc:
            if not self.cancel.is_set():
                log.warning("cannot persist staging state of %s: %s", self.name, exc)

    def persist_progress(self) -> None:
        """Caller holds `lock`: persist unless that was done less than a moment ago."""
        if time.monotonic() - self.last_persist >= PERSIST_INTERVAL_S:
            self.persist()


def summarise(result: CopyResult | None) -> str:
    """A failed copy's outcome for Status.last_error: counts and the first few errors."""
    if result is None:
        return "failed"
    text = result.summary()
    if result.errors:
        shown = "; ".join(f"{e.path}: {e.message}" for e in result.errors[:3])
        more = f" (and {len(result.errors) - 3} more)" if len(result.errors) > 3 else ""
        text += f". Errors: {shown}{more}"
    return text
