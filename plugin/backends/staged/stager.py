"""Mount-time staging of local volumes: stage-in fills the data directory from S3 or a host
path when the volume is mounted, stage-out uploads new and changed files to S3 after the last
Unmount.

Why a layer over local volumes: the container gets an ordinary local directory (no FUSE in the
data path), so the only staging work is *when* to run the copy engine and how to stay inside
Docker's deadlines. The local backend calls the hooks here under the driver's per-volume lock;
jobs run on threads (`plugin.backends.staged.jobs`) and Mount waits for stage-in only up to
`stage_timeout`, outside that lock (`MountPendingError`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from plugin.backends.credentials import CredentialsFile
from plugin.backends.staged.jobs import DEFAULT_JOBS, JobRunner
from plugin.backends.staged.marker import drop_marker, ensure_marker
from plugin.backends.staged.options import StagingConfig, split_s3, validate_options
from plugin.backends.staged.state import STATE_FILE, StagedVolume
from plugin.errors import BackendError, InvalidOptionError, MountError, MountPendingError
from plugin.records import VolumeRecord
from plugin.staging.objcache import ObjectCache

log = logging.getLogger(__name__)


class Stager:
    """Runs and tracks the staging jobs of every staged local volume."""

    def __init__(
        self,
        root: Path,
        allowed_check: Callable[[str], Path],
        credentials: CredentialsFile | None = None,
        room: Callable[[str], tuple[int, int] | None] | None = None,
        jobs: int = DEFAULT_JOBS,
        object_cache: ObjectCache | None = None,
    ) -> None:
        """`room(name)`: (bytes available, bytes used) of a size-limited volume, None for
        one without a limit; stage-in checks the source fits before copying anything.
        `jobs`: parallel file copies of each staging job (a daemon setting). `object_cache`:
        the host-wide stage-in cache (`--stage-cache`), shared by every volume's stage-in."""
        self.root = root
        self.credentials = credentials or CredentialsFile(root / "credentials")
        self._allowed_check = allowed_check
        self._runner = JobRunner(allowed_check, self.credentials, room, jobs, object_cache)
        self._lock = threading.Lock()
        self._volumes: dict[str, StagedVolume] = {}

    # -- create-time checks --------------------------------------------------------------------

    def validate(self, options: Mapping[str, str]) -> None:
        """Cross-option checks, host path allowed, and buckets reachable (short timeouts)."""
        config = validate_options(options)
        if config.stage_in and not config.stage_in_is_s3:
            real = self._allowed_check(config.stage_in)
            if not real.is_dir():
                raise InvalidOptionError(
                    f"stage_in {config.stage_in!r} is not an existing directory"
                )
        for url in (config.stage_in if config.stage_in_is_s3 else None, config.stage_out):
            if url:
                self._check_bucket(url, options)

    def _check_bucket(self, url: str, options: Mapping[str, str]) -> None:
        from plugin.backends.reach import check_bucket_reachable

        try:
            check_bucket_reachable(split_s3(url)[0], options, self.credentials)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{url}: {exc}") from None

    # -- lifecycle hooks (called by LocalBackend under the driver's per-volume lock) ------------

    def _volume(self, record: VolumeRecord, data: Path, state_dir: Path) -> StagedVolume | None:
        with self._lock:
            vol = self._volumes.get(record.name)
        if vol is not None:
            return vol
        config = StagingConfig.from_options(record.options)
        if not config.active:
            return None
        with self._lock:
            vol = self._volumes.get(record.name)
            if vol is None:
                vol = StagedVolume(record.name, config, data, state_dir / STATE_FILE)
                self._volumes[record.name] = vol
            return vol

    @staticmethod
    def _stage_in_due(vol: StagedVolume) -> bool:
        if vol.config.policy == "always":
            return not vol.state.stage_in_fresh
        return not vol.state.stage_in_completed

    def created(self, record: VolumeRecord, data: Path, state_dir: Path) -> None:
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return
        with vol.lock:
            if not vol.state_file.exists():
                vol.persist()
            if vol.config.stage_in and vol.config.prefetch and self._stage_in_due(vol):
                self._runner.start_stage_in(vol)

    def mount(self, record: VolumeRecord, data: Path, state_dir: Path) -> bool:
        """Start stage-in if due; while it runs, raise MountPendingError (never wait here: the
        caller holds the volume's lock) so the caller waits outside its lock and mounts again.
        True if this is an unmounted-to-mounted transition of a volume with stage-in."""
        vol = self._volume(record, data, state_dir)
        if vol is None or vol.mounted:
            return False
        if vol.config.stage_in:
            with vol.lock:
                running = vol.stage_in_running()
                if not running and self._stage_in_due(vol):
                    self._runner.start_stage_in(vol)
                    running = True
                if running:
                    raise MountPendingError(
                        f"volume {record.name!r} is staging in from {vol.config.stage_in}",
                        lambda deadline: self._await_stage_in(vol, deadline),
                        time.monotonic() + vol.config.timeout,
                    )
        ensure_marker(vol.data)
        vol.mounted = True
        return bool(vol.config.stage_in)

    def _await_stage_in(self, vol: StagedVolume, deadline: float) -> None:
        """Wait (holding no lock) for the running stage-in until `deadline`; raise MountError
        with its progress if it still runs, or with its error if it failed."""
        vol.in_done.wait(max(0.0, deadline - time.monotonic()))
        with vol.lock:
            job = vol.state.stage_in
            if vol.cancel.is_set():
                raise MountError(f"volume {vol.name!r} was removed while it was staging in")
            if vol.stage_in_running():
                raise MountError(
                    f"volume {vol.name!r} is still staging in from {vol.config.stage_in}: "
                    f"{job.progress_text()}. Staging continues in the background; run the "
                    "container again when it is done (`docker volume inspect` shows "
                    "Status.stage_in)"
                )
            if self._stage_in_due(vol):
                raise MountError(
                    f"stage-in of volume {vol.name!r} from {vol.config.stage_in} failed: "
                    f"{job.last_error or job.state}. The next mount retries it (finished "
                    "files are kept)"
                )

    def unmount(self, record: VolumeRecord) -> None:
        """The last mount let go: mark a refresh due (always) and schedule stage-out."""
        with self._lock:
            vol = self._volumes.get(record.name)
        if vol is None:
            return
        vol.mounted = False
        drop_marker(vol.data)  # back at the next Mount if the volume is still empty
        with vol.lock:
            if vol.config.policy == "always" and vol.state.stage_in_fresh:
                vol.state.stage_in_fresh = False
                vol.persist()
            if vol.config.stage_out:
                self._runner.schedule_stage_out(vol)

    def remove(self, record: VolumeRecord, data: Path, state_dir: Path) -> None:
        """Refuse while stage-out has data to upload (unless discard_unstaged); stop jobs."""
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return
        with vol.lock:
            out = vol.state.stage_out
            unsaved = bool(vol.config.stage_out) and (
                out.state in ("pending", "running", "failed") or vol.mounted
            )
            if unsaved and not vol.config.discard:
                if vol.mounted and out.state not in ("pending", "running"):
                    # Only stale mount IDs (a crash): upload what the crashed container left.
                    vol.mounted = False
                    self._runner.schedule_stage_out(vol, 0.0)
                hint = (
                    "Run a container with the volume to retry it, then remove again"
                    if out.state == "failed"
                    else "Wait until `docker volume inspect` shows Status.stage_out.state done"
                )
                last = f"; last error: {out.last_error}" if out.last_error else ""
                raise BackendError(
                    f"refusing to remove volume {record.name!r}: stage-out to "
                    f"{vol.config.stage_out} is {out.state} ({out.progress_text()}{last}), and "
                    f"removing now would lose data. {hint}; or create volumes "
                    "with -o discard_unstaged=true to allow this"
                )
        vol.cancel.set()
        for thread in (vol.in_thread, vol.out_thread):
            if thread is not None:
                thread.join(20)
        with self._lock:
            self._volumes.pop(record.name, None)

    def recover(self, record: VolumeRecord, data: Path, state_dir: Path, mounted: bool) -> None:
        """After a restart: resume stage-in that was running, and unfinished stage-out."""
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return
        vol.mounted = mounted
        with vol.lock:
            if vol.config.stage_in and vol.state.stage_in.state in ("pending", "running"):
                log.info("resuming interrupted stage-in of %s", record.name)
                self._runner.start_stage_in(vol)
            unfinished = vol.state.stage_out.state in ("pending", "running", "failed")
            if vol.config.stage_out and unfinished and not mounted:
                log.info("resuming unfinished stage-out of %s", record.name)
                self._runner.schedule_stage_out(vol, 0.0)

    # -- what others ask -----------------------------------------------------------------------

    def status(self, record: VolumeRecord, data: Path, state_dir: Path) -> dict[str, Any]:
        """In-memory (or, once per volume after a restart, persisted) state only: fast."""
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return {}
        result: dict[str, Any] = {}
        with vol.lock:
            st = vol.state
            if vol.config.stage_in:
                result["stage_in"] = {
                    **asdict(st.stage_in),
                    "source": vol.config.stage_in,
                    "policy": vol.config.policy,
                    "progress": st.stage_in.progress_text(),
                    "completed_once": st.stage_in_completed,
                    "source_empty": st.stage_in_source_empty,
                }
            if vol.config.stage_out:
                result["stage_out"] = {
                    **asdict(st.stage_out),
                    "destination": vol.config.stage_out,
                    "progress": st.stage_out.progress_text(),
                    "last_success": st.last_stage_out,
                }
        return result

    def wait_idle(self, name: str, timeout: float) -> bool:
        """For tests and tools: True once no job of *name* is running (within *timeout*)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                vol = self._volumes.get(name)
            if vol is None:
                return True
            threads = [t for t in (vol.in_thread, vol.out_thread) if t is not None]
            if not any(t.is_alive() for t in threads):
                return True
            time.sleep(0.05)
        return False

    def handover_state(self, name: str) -> str:
        """For the registry's lease (plugin.registry.lease): `busy` while the volume is mounted
        or stage-out has work, `failed` when stage-out gave up, `idle` when nothing here is
        newer than what was uploaded, so another host may take the volume."""
        with self._lock:
            vol = self._volumes.get(name)
        if vol is None:
            return "idle"
        with vol.lock:
            out = vol.state.stage_out.state
            if vol.mounted or vol.stage_out_running() or out in ("pending", "running"):
                return "busy"
            return "failed" if out == "failed" else "idle"

    def force_stage_in(self, record: VolumeRecord, data: Path, state_dir: Path) -> None:
        """Make the next Mount stage in again, whatever the policy: another host held the
        volume since, so what is here may be older than the remote copy."""
        vol = self._volume(record, data, state_dir)
        if vol is None or vol.mounted:
            return
        with vol.lock:
            # Files deleted on the other host must go here too, but only if everything
            # written here reached the remote: after a failed or pending stage-out, the
            # stage-in adds and updates files and deletes nothing.
            replaces = vol.state.stage_out.state in ("", "done") and not vol.stage_out_running()
            if (
                vol.state.stage_in_completed
                or vol.state.stage_in_fresh
                or vol.state.stage_in_replaces != replaces
            ):
                vol.state.stage_in_completed = vol.state.stage_in_fresh = False
                vol.state.stage_in_replaces = replaces
                vol.persist()
