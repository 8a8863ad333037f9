"""The staging jobs themselves: stage-in and stage-out threads, their retries, and the calls
into the copy engine (plugin.staging).

Why threads: Docker's Mount and Unmount must answer within their deadlines whatever the size of
the volume, so copies run in the background and record their outcome in the volume's
`StagedVolume` (under its lock, persisted); `plugin.backends.staged.stager` decides *when* a
job starts and reads the outcome.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from plugin.backends.credentials import CredentialsFile
from plugin.backends.staged.marker import MARKER_NAME, drop_marker
from plugin.backends.staged.options import StagingConfig
from plugin.backends.staged.state import JobState, StagedVolume, now, summarise
from plugin.errors import BackendError, InvalidOptionError
from plugin.staging.engine import CopyOptions, S3Options, copy
from plugin.staging.errors import SourceNotFoundError, StagingError
from plugin.staging.locations import LocalLocation
from plugin.staging.objcache import ObjectCache
from plugin.staging.progress import CopyResult, Progress
from plugin.units import format_bytes

if TYPE_CHECKING:  # boto3 is imported only once a job talks to S3: the daemon starts faster
    from plugin.s3.client import S3Settings

#: MARKER_NAME is re-exported for tests that patch this module's timings and read the marker's
#: name from the same alias (tests/staging/test_staged_volumes_s3.py).
__all__ = ["DEFAULT_JOBS", "MARKER_NAME", "JobRunner"]

log = logging.getLogger(__name__)

#: Stage-out starts this long after the last Unmount. Docker's copy-up at container create is a
#: Mount/Unmount pair followed at once by the container's own Mount; the grace avoids a
#: pointless upload between the two.
STAGE_OUT_DELAY_S = 2.0
#: Stage-out attempts and the first backoff delay (doubled per attempt, capped at 60 s).
STAGE_OUT_ATTEMPTS = 5
STAGE_OUT_BACKOFF_S = 5.0
#: Parallel file copies of one job, unless the daemon says otherwise.
DEFAULT_JOBS = 4


@dataclass(eq=False)
class JobRunner:
    """Starts and runs the jobs of staged volumes; holds what every job needs."""

    allowed_check: Callable[[str], Path]
    credentials: CredentialsFile
    room: Callable[[str], tuple[int, int] | None] | None = None
    jobs: int = DEFAULT_JOBS
    object_cache: ObjectCache | None = None

    # -- stage-in ------------------------------------------------------------------------------

    def start_stage_in(self, vol: StagedVolume) -> None:
        """Caller holds vol.lock."""
        if vol.stage_in_running():
            return
        job = vol.state.stage_in
        job.state, job.last_error, job.started_at = "running", None, now()
        job.attempts += 1
        vol.persist()
        vol.in_done.clear()
        vol.in_thread = threading.Thread(
            target=self._run_stage_in, args=(vol,), name=f"stage-in {vol.name}", daemon=True
        )
        vol.in_thread.start()

    def _run_stage_in(self, vol: StagedVolume) -> None:
        assert vol.config.stage_in is not None
        empty = False
        result: CopyResult | None = None
        error: str | None = None
        try:
            src: str | LocalLocation
            if vol.config.stage_in_is_s3:
                src = vol.config.stage_in.rstrip("/") + "/"
            else:
                # Resolved and checked against the allowed paths now, then opened with no
                # symlink followed: a component swapped for a link since is refused.
                real = self.allowed_check(vol.config.stage_in)
                src = LocalLocation(str(real), trailing_slash=True, no_symlinks=True)
            result = self._copy(
                vol,
                src,
                str(vol.data) + "/",
                vol.state.stage_in,
                delete_extraneous=vol.state.stage_in_replaces,
            )
        except SourceNotFoundError as exc:
            if vol.config.stage_in_is_s3:
                empty = True  # no objects yet: e.g. the first run of a stage-in/out workflow
            else:
                error = str(exc)
        except (StagingError, InvalidOptionError, BackendError) as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("stage-in of %s crashed", vol.name)
            error = f"internal error: {exc}"
        with vol.lock:
            job = vol.state.stage_in
            if vol.cancel.is_set():
                vol.in_done.set()  # a Mount waiting for it fails at once
                return
            if result is not None:
                job.finish(result)
            if empty or (result is not None and result.ok):
                job.state, job.last_error = "done", None
                if empty:
                    job.finished_at = now()
                vol.state.stage_in_completed = vol.state.stage_in_fresh = True
                vol.state.stage_in_source_empty = empty
                if result is not None:
                    vol.state.stage_in_replaces = False
            else:
                job.state = "failed"
                job.last_error = error or summarise(result)
            vol.persist()
            vol.in_done.set()
        log.info("stage-in of %s: %s %s", vol.name, job.state, job.last_error or "")

    # -- stage-out -----------------------------------------------------------------------------

    def schedule_stage_out(self, vol: StagedVolume, delay: float | None = None) -> None:
        """Caller holds vol.lock. Stage-out after *delay* seconds (default: the grace after an
        Unmount); a running stage-out runs once more when it finishes."""
        job = vol.state.stage_out
        if vol.stage_out_running():
            vol.out_rerun = True
            return
        job.state, job.attempts = "pending", 0
        vol.persist()
        vol.out_thread = threading.Thread(
            target=self._run_stage_out,
            args=(vol, STAGE_OUT_DELAY_S if delay is None else delay),
            name=f"stage-out {vol.name}",
            daemon=True,
        )
        vol.out_thread.start()

    def _run_stage_out(self, vol: StagedVolume, delay: float) -> None:
        while True:
            if delay and vol.cancel.wait(delay):
                return
            if vol.mounted:
                return  # mounted again: the upload happens after the next last Unmount
            self._stage_out_attempts(vol)
            with vol.lock:
                if vol.cancel.is_set() or not vol.out_rerun:
                    return
                vol.out_rerun = False
                vol.state.stage_out.state = "pending"
                vol.persist()
            delay = 0.0

    def _stage_out_attempts(self, vol: StagedVolume) -> None:
        backoff = STAGE_OUT_BACKOFF_S
        for attempt in range(1, STAGE_OUT_ATTEMPTS + 1):
            with vol.lock:
                job = vol.state.stage_out
                job.state, job.attempts, job.started_at = "running", attempt, now()
                vol.persist()
            if not vol.mounted:
                drop_marker(vol.data)
            error, result = self._stage_out_once(vol, job)
            with vol.lock:
                if vol.cancel.is_set():
                    return
                if result is not None:
                    job.finish(result)
                if error is None and result is not None and result.ok:
                    job.state, job.last_error = "done", None
                    vol.state.last_stage_out = job.finished_at
                    vol.persist()
                    log.info("stage-out of %s: %s", vol.name, result.summary())
                    return
                job.last_error = error or summarise(result)
                final = attempt == STAGE_OUT_ATTEMPTS
                job.state = "failed" if final else "running"
                vol.persist()
            log.warning(
                "stage-out of %s, attempt %s of %s: %s",
                vol.name,
                attempt,
                STAGE_OUT_ATTEMPTS,
                job.last_error,
            )
            if final or vol.cancel.wait(backoff):
                return
            backoff = min(backoff * 2, 60.0)

    def _stage_out_once(
        self, vol: StagedVolume, job: JobState
    ) -> tuple[str | None, CopyResult | None]:
        """One attempt: (error, result); the mirror step runs only after a complete copy."""
        assert vol.config.stage_out is not None
        dst = vol.config.stage_out.rstrip("/") + "/"
        result: CopyResult | None = None
        try:
            result = self._copy(
                vol, str(vol.data) + "/", dst, job, delete_extraneous=vol.config.mirror
            )
            return None, result
        except (StagingError, BackendError) as exc:
            return str(exc), result
        except Exception as exc:
            log.exception("stage-out of %s crashed", vol.name)
            return f"internal error: {exc}", result

    # -- the copy engine -----------------------------------------------------------------------

    def s3_settings(self, config: StagingConfig) -> S3Settings:
        from plugin.s3.client import S3Settings

        return S3Settings(
            endpoint_url=config.endpoint,
            region=config.region,
            profile=config.profile,
            credentials_file=self.credentials.usable(),
            max_attempts=1,
        )

    def _copy(
        self,
        vol: StagedVolume,
        src: str | LocalLocation,
        dst: str,
        job: JobState,
        delete_extraneous: bool = False,
    ) -> CopyResult:
        fit_checked = dst.startswith("s3://") or self.room is None

        def progress(p: Progress) -> None:
            nonlocal fit_checked
            if not fit_checked and p.state == "copying":
                # The first "copying" report comes once the source is listed, before any
                # byte is written; raising here ends the copy (and fails the job) at once.
                fit_checked = True
                self._check_fits(vol, p.bytes_total)
            with vol.lock:
                job.update(p)
                vol.persist_progress()

        config = vol.config
        options = CopyOptions(
            jobs=self.jobs,
            preserve_owner=True if config.preserve_owner else None,
            owner=config.owner,
            bwlimit=config.bwlimit,
            dir_markers=self._dir_markers(vol, dst) is not False,
            progress=progress,
            progress_interval=0.5,
            cancel=vol.cancel,
            delete_extraneous=delete_extraneous,
            object_cache=self.object_cache if dst.startswith("/") else None,
        )
        store = None
        if config.profile and self.credentials.usable():
            # Profiles from the daemon's credentials file: only the boto3 store takes a custom
            # session.
            from plugin.s3.boto3store import Boto3Store
            from plugin.s3.client import make_s3_client

            settings = self.s3_settings(config)
            store = Boto3Store(settings, client=make_s3_client(settings))
        s3 = S3Options(endpoint_url=config.endpoint, region=config.region, profile=config.profile)
        return copy(src, dst, options, s3=s3, store=store)

    def _dir_markers(self, vol: StagedVolume, dst: str) -> bool | None:
        """The volume's dir_markers, `auto` asked of an S3 destination once per daemon run."""
        markers = vol.config.dir_markers
        if markers is None and dst.startswith("s3://"):
            if vol.probed_markers is None:
                from plugin.s3.markers import resolve_dir_markers

                bucket, _, prefix = dst[len("s3://") :].partition("/")
                vol.probed_markers = resolve_dir_markers(
                    None, self.s3_settings(vol.config), bucket, prefix
                )
            markers = vol.probed_markers
        return markers

    def _check_fits(self, vol: StagedVolume, needed: int) -> None:
        """BackendError if stage-in's *needed* bytes cannot fit in a size-limited volume even
        if every byte in it now were overwritten (free space plus what is in use: files copied
        by an interrupted run count once)."""
        room = self.room(vol.name) if self.room is not None else None
        if room is None:
            return
        available, used = room
        if needed > available + used:
            raise BackendError(
                f"stage-in source {vol.config.stage_in} holds {format_bytes(needed)} ({needed} "
                f"bytes), more than volume {vol.name!r} can hold: {format_bytes(available)} free "
                f"and {format_bytes(used)} in use ({available + used} bytes); nothing was "
                "copied. Grow it with `stowage volume resize NAME SIZE`, or create it with a "
                "larger size="
            )
