"""Mount-time staging of local volumes: stage-in fills the data directory from S3 or a host path
when the volume is mounted, stage-out uploads new and changed files to S3 after the last Unmount.

Why a separate module: the container gets an ordinary local directory (no FUSE in the data
path), so the only staging work is *when* to run the copy core (plugin.staging) and how to stay
inside Docker's deadlines. Jobs run on background threads; Mount waits for stage-in only up to
`stage_timeout`. Job state is persisted atomically (temp + fsync + rename) after every state
change and every few seconds of progress, so a restarted daemon resumes what was running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plugin.backends.credentials import CredentialsFile
from plugin.confined import Tree
from plugin.errors import BackendError, InvalidOptionError, MountError, MountPendingError
from plugin.options import (
    OptionSpec,
    check_bucket_name,
    check_text,
    check_url,
    parse_bool,
    parse_id,
    parse_size,
)
from plugin.records import VolumeRecord
from plugin.staging.engine import CopyOptions, S3Options, copy
from plugin.staging.errors import SourceNotFoundError, StagingError
from plugin.staging.locations import LocalLocation
from plugin.staging.progress import CopyResult, Progress

log = logging.getLogger(__name__)

#: Default and ceiling of how long Mount waits for stage-in: Docker gives Mount two minutes.
DEFAULT_STAGE_TIMEOUT_S = 60.0
MAX_STAGE_TIMEOUT_S = 110.0
#: Stage-out starts this long after the last Unmount. Docker's copy-up at container create is a
#: Mount/Unmount pair followed at once by the container's own Mount; the grace avoids a
#: pointless upload between the two.
STAGE_OUT_DELAY_S = 2.0
#: Stage-out attempts and the first backoff delay (doubled per attempt, capped at 60 s).
STAGE_OUT_ATTEMPTS = 5
STAGE_OUT_BACKOFF_S = 5.0
#: Progress is persisted at most this often (state changes are persisted at once).
PERSIST_INTERVAL_S = 2.0
#: Put in an otherwise empty staged volume while it is mounted, so Docker never copies image
#: content into it (and a later stage-out never uploads image files by surprise).
MARKER_NAME = ".stowage-staged"
MARKER_TEXT = (
    "Placed by stowage in an empty staged volume so that Docker does not copy image content\n"
    "into it. It is never staged out; deleting it is harmless.\n"
)
STATE_FILE = "staging.json"


def _check_stage_in(value: str) -> str:
    if value.lower().startswith("s3://"):
        return _check_s3_url(value)
    if not value.startswith("/") or "\0" in value:
        raise ValueError("expected s3://bucket/prefix or an absolute host path")
    return value


def _check_dir_markers(value: str) -> str:
    from plugin import s3client

    return s3client.check_dir_markers(value)


def _check_s3_url(value: str) -> str:
    if not value.lower().startswith("s3://"):
        raise ValueError("expected s3://bucket/prefix")
    try:
        check_bucket_name(value[5:].partition("/")[0])
    except ValueError as exc:
        raise ValueError(f"expected s3://bucket/prefix: {exc}") from None
    if "\0" in value or "\n" in value:
        raise ValueError("must not contain NUL or newline characters")
    return value


def _check_policy(value: str) -> str:
    if value.strip().lower() not in ("once", "always"):
        raise ValueError("expected once or always")
    return value


def parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not 1 <= seconds <= MAX_STAGE_TIMEOUT_S:
        raise ValueError(
            f"expected 1 to {MAX_STAGE_TIMEOUT_S:.0f} seconds (Docker gives Mount two minutes)"
        )
    return seconds


def parse_rate(value: str) -> int:
    rate = parse_size(value)
    if rate < 1024:
        raise ValueError("expected at least 1K bytes per second")
    return rate


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "stage_in", "fill the volume from s3://bucket/prefix or a host path", _check_stage_in
    ),
    OptionSpec(
        "stage_in_policy",
        "once (default: first mount only) or always (refresh at every first mount)",
        _check_policy,
    ),
    OptionSpec("prefetch", "true: start stage-in at create, in the background", parse_bool),
    OptionSpec(
        "stage_out",
        "upload new and changed files to s3://bucket/prefix after the last unmount",
        _check_s3_url,
    ),
    OptionSpec(
        "stage_out_mirror", "true: stage-out also deletes remote objects gone locally", parse_bool
    ),
    OptionSpec(
        "stage_timeout", "seconds Mount waits for stage-in (default 60, max 110)", parse_timeout
    ),
    OptionSpec("stage_bwlimit", "staging bandwidth limit in bytes/s, e.g. 50M", parse_rate),
    OptionSpec(
        "discard_unstaged",
        "true: `docker volume rm` may drop data that stage-out has not uploaded",
        parse_bool,
    ),
    OptionSpec(
        "dir_markers",
        "`dir/` objects for empty directories at stage-out: auto (default: what the server "
        "can keep, asked at stage-out; rclone serve s3 cannot), true or false",
        _check_dir_markers,
    ),
    OptionSpec(
        "preserve_owner",
        "true: staged files keep the uid/gid recorded in the source (S3 x-amz-meta-uid/gid "
        "included); default: the volume's uid=/gid= options, else root",
        parse_bool,
    ),
    OptionSpec("endpoint", "S3 endpoint URL of stage_in/stage_out", check_url),
    OptionSpec("region", "S3 region of stage_in/stage_out", check_text),
    OptionSpec("profile", "named profile from the daemon's credentials", check_text),
)
S3_ONLY = ("endpoint", "region", "profile", "dir_markers")
STAGE_IN_ONLY = ("stage_in_policy", "prefetch", "stage_timeout")


@dataclass(frozen=True)
class StagingConfig:
    """A volume's staging options, parsed."""

    stage_in: str | None = None
    policy: str = "once"
    prefetch: bool = False
    stage_out: str | None = None
    mirror: bool = False
    timeout: float = DEFAULT_STAGE_TIMEOUT_S
    bwlimit: int | None = None
    discard: bool = False
    #: None: `auto`, asked of the server at stage-out.
    dir_markers: bool | None = None
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    preserve_owner: bool = False
    #: The volume's uid=/gid= options: the owner of every staged file (-1: unchanged).
    owner: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, opts: Mapping[str, str]) -> StagingConfig:
        if "stage_in" not in opts and "stage_out" not in opts:
            return _INACTIVE
        timeout = opts.get("stage_timeout")
        bwlimit = opts.get("stage_bwlimit")
        return cls(
            stage_in=opts.get("stage_in") or None,
            policy=opts.get("stage_in_policy", "once").strip().lower(),
            prefetch=parse_bool(opts.get("prefetch", "false")),
            stage_out=opts.get("stage_out") or None,
            mirror=parse_bool(opts.get("stage_out_mirror", "false")),
            timeout=parse_timeout(timeout) if timeout else DEFAULT_STAGE_TIMEOUT_S,
            bwlimit=parse_rate(bwlimit) if bwlimit else None,
            discard=parse_bool(opts.get("discard_unstaged", "false")),
            dir_markers=None
            if opts.get("dir_markers", "auto").strip().lower() == "auto"
            else parse_bool(opts["dir_markers"]),
            endpoint=opts.get("endpoint"),
            region=opts.get("region"),
            profile=opts.get("profile"),
            preserve_owner=parse_bool(opts.get("preserve_owner", "false")),
            owner=_owner_option(opts),
        )

    @property
    def active(self) -> bool:
        return bool(self.stage_in or self.stage_out)

    @property
    def stage_in_is_s3(self) -> bool:
        return bool(self.stage_in and self.stage_in.lower().startswith("s3://"))


_INACTIVE = StagingConfig()


def _owner_option(opts: Mapping[str, str]) -> tuple[int, int] | None:
    if "uid" not in opts and "gid" not in opts:
        return None
    uid = parse_id(opts["uid"]) if "uid" in opts else -1
    gid = parse_id(opts["gid"]) if "gid" in opts else -1
    return uid, gid


def validate_options(options: Mapping[str, str]) -> StagingConfig:
    """Checks across options (the table checks each value alone); returns the parsed config."""
    config = StagingConfig.from_options(options)
    if not config.active:
        extra = (
            *S3_ONLY,
            *STAGE_IN_ONLY,
            "stage_out_mirror",
            "stage_bwlimit",
            "discard_unstaged",
            "preserve_owner",
        )
        stray = sorted(k for k in extra if k in options)
        if stray:
            raise InvalidOptionError(
                f"option(s) {', '.join(stray)} only apply to staged volumes: add "
                "-o stage_in=s3://bucket/prefix (or a host path) or -o stage_out=s3://bucket/prefix"
            )
        return config
    if "path" in options:
        raise InvalidOptionError(
            "stage_in/stage_out apply to managed local volumes, not to path= volumes (stowage "
            "never writes staged data into a host directory you own); drop path="
        )
    if not config.stage_in:
        stray = sorted(k for k in STAGE_IN_ONLY if k in options)
        if stray:
            raise InvalidOptionError(
                f"option(s) {', '.join(stray)} need -o stage_in=s3://bucket/prefix or a host path"
            )
    if "stage_out_mirror" in options and not config.stage_out:
        raise InvalidOptionError("stage_out_mirror needs -o stage_out=s3://bucket/prefix")
    if not (config.stage_in_is_s3 or config.stage_out):
        stray = sorted(k for k in S3_ONLY if k in options)
        if stray:
            raise InvalidOptionError(
                f"option(s) {', '.join(stray)} apply to S3 staging only, and stage_in is a host "
                "path"
            )
    return config


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of s3://bucket/prefix."""
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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

    def progress_text(self) -> str:
        text = (
            f"{_human(self.bytes_done)} of {_human(self.bytes_total)}, "
            f"{self.files_done} of {self.files_total} files"
        )
        if self.state == "running":
            text += f", {_human(self.rate)}/s"
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
        if result.ok:
            self.bytes_done, self.files_done = result.bytes_total, result.files_total
        else:
            moved = result.bytes_copied + result.bytes_resumed + result.bytes_skipped
            self.bytes_done = min(moved, result.bytes_total)
            self.files_done = result.files_copied + result.files_skipped
        self.rate = 0.0
        self.eta = 0.0 if result.ok else None
        self.finished_at = _now()


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
        )


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync of the directory: a crash leaves old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _Volume:
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

    def persist(self) -> None:
        """Caller holds `lock`."""
        self.last_persist = time.monotonic()
        payload = json.dumps(asdict(self.state), indent=1).encode()
        try:
            write_atomically(self.state_file, payload)
        except OSError as exc:
            if not self.cancel.is_set():
                log.warning("cannot persist staging state of %s: %s", self.name, exc)


class Stager:
    """Runs and tracks the staging jobs of every staged local volume."""

    def __init__(
        self,
        root: Path,
        allowed_check: Callable[[str], Path],
        credentials: CredentialsFile | None = None,
        room: Callable[[str], tuple[int, int] | None] | None = None,
    ) -> None:
        """`room(name)`: (bytes available, bytes used) of a size-limited volume, None for
        one without a limit; stage-in checks the source fits before copying anything."""
        self.root = root
        self.credentials = credentials or CredentialsFile(root / "credentials")
        self._allowed_check = allowed_check
        self._room = room
        self._lock = threading.Lock()
        self._volumes: dict[str, _Volume] = {}

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
                self._check_bucket(config, url)

    def _check_bucket(self, config: StagingConfig, url: str) -> None:
        from plugin.backends.s3 import S3Backend

        bucket, _ = split_s3(url)
        checker = S3Backend(self.root, self.root / "mounts", self.credentials)
        opts = {"bucket": bucket}
        for key, value in (
            ("endpoint", config.endpoint),
            ("region", config.region),
            ("profile", config.profile),
        ):
            if value:
                opts[key] = value
        try:
            checker._check_bucket_reachable(opts)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{url}: {exc}") from None

    # -- lifecycle hooks (called by LocalBackend under the driver's per-volume lock) ------------

    def _volume(self, record: VolumeRecord, data: Path, state_dir: Path) -> _Volume | None:
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
                vol = _Volume(record.name, config, data, state_dir / STATE_FILE)
                self._volumes[record.name] = vol
            return vol

    def created(self, record: VolumeRecord, data: Path, state_dir: Path) -> None:
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return
        with vol.lock:
            if not vol.state_file.exists():
                vol.persist()
            if vol.config.stage_in and vol.config.prefetch and self._stage_in_due(vol):
                self._start_stage_in(vol)

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
                    self._start_stage_in(vol)
                    running = True
                if running:
                    raise MountPendingError(
                        f"volume {record.name!r} is staging in from {vol.config.stage_in}",
                        lambda deadline: self._await_stage_in(vol, deadline),
                        time.monotonic() + vol.config.timeout,
                    )
        self._ensure_marker(vol)
        vol.mounted = True
        return bool(vol.config.stage_in)

    def _await_stage_in(self, vol: _Volume, deadline: float) -> None:
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
        self._drop_marker(vol)  # back at the next Mount if the volume is still empty
        with vol.lock:
            if vol.config.policy == "always" and vol.state.stage_in_fresh:
                vol.state.stage_in_fresh = False
                vol.persist()
            if vol.config.stage_out:
                self._schedule_stage_out(vol, STAGE_OUT_DELAY_S)

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
                    self._schedule_stage_out(vol, 0.0)
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
                self._start_stage_in(vol)
            unfinished = vol.state.stage_out.state in ("pending", "running", "failed")
            if vol.config.stage_out and unfinished and not mounted:
                log.info("resuming unfinished stage-out of %s", record.name)
                self._schedule_stage_out(vol, 0.0)

    def status(self, record: VolumeRecord, data: Path, state_dir: Path) -> dict[str, Any]:
        """In-memory (or, once per volume after a restart, persisted) state only: fast."""
        vol = self._volume(record, data, state_dir)
        if vol is None:
            return {}
        result: dict[str, Any] = {}
        with vol.lock:
            st = vol.state
            if vol.config.stage_in:
                job = asdict(st.stage_in)
                job.update(
                    source=vol.config.stage_in,
                    policy=vol.config.policy,
                    progress=st.stage_in.progress_text(),
                    completed_once=st.stage_in_completed,
                    source_empty=st.stage_in_source_empty,
                )
                result["stage_in"] = job
            if vol.config.stage_out:
                job = asdict(st.stage_out)
                job.update(
                    destination=vol.config.stage_out,
                    progress=st.stage_out.progress_text(),
                    last_success=st.last_stage_out,
                )
                result["stage_out"] = job
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
            thread = vol.out_thread is not None and vol.out_thread.is_alive()
            if vol.mounted or thread or out in ("pending", "running"):
                return "busy"
            return "failed" if out == "failed" else "idle"

    def force_stage_in(self, record: VolumeRecord, data: Path, state_dir: Path) -> None:
        """Make the next Mount stage in again, whatever the policy: another host held the
        volume since, so what is here may be older than the remote copy."""
        vol = self._volume(record, data, state_dir)
        if vol is None or vol.mounted:
            return
        with vol.lock:
            if vol.state.stage_in_completed or vol.state.stage_in_fresh:
                vol.state.stage_in_completed = vol.state.stage_in_fresh = False
                vol.persist()

    # -- stage-in ------------------------------------------------------------------------------

    @staticmethod
    def _stage_in_due(vol: _Volume) -> bool:
        if vol.config.policy == "always":
            return not vol.state.stage_in_fresh
        return not vol.state.stage_in_completed

    def _start_stage_in(self, vol: _Volume) -> None:
        """Caller holds vol.lock."""
        if vol.stage_in_running():
            return
        job = vol.state.stage_in
        job.state, job.last_error, job.started_at = "running", None, _now()
        job.attempts += 1
        vol.persist()
        vol.in_done.clear()
        vol.in_thread = threading.Thread(
            target=self._run_stage_in, args=(vol,), name=f"stage-in {vol.name}", daemon=True
        )
        vol.in_thread.start()

    def _run_stage_in(self, vol: _Volume) -> None:
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
                real = self._allowed_check(vol.config.stage_in)
                src = LocalLocation(str(real), trailing_slash=True, no_symlinks=True)
            result = self._copy(vol, src, str(vol.data) + "/", vol.state.stage_in)
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
                vol.in_done.set()  # a Mount waiting for it fails at once (_await_stage_in)
                return
            if result is not None:
                job.finish(result)
            if empty or (result is not None and result.ok):
                job.state, job.last_error = "done", None
                if empty:
                    job.finished_at = _now()
                vol.state.stage_in_completed = vol.state.stage_in_fresh = True
                vol.state.stage_in_source_empty = empty
            else:
                job.state = "failed"
                job.last_error = error or _summarise(result)
            vol.persist()
            vol.in_done.set()
        log.info("stage-in of %s: %s %s", vol.name, job.state, job.last_error or "")

    # -- stage-out -----------------------------------------------------------------------------

    def _schedule_stage_out(self, vol: _Volume, delay: float) -> None:
        """Caller holds vol.lock. A running stage-out runs once more when it finishes."""
        job = vol.state.stage_out
        if vol.out_thread is not None and vol.out_thread.is_alive():
            vol.out_rerun = True
            return
        job.state, job.attempts = "pending", 0
        vol.persist()
        vol.out_thread = threading.Thread(
            target=self._run_stage_out,
            args=(vol, delay),
            name=f"stage-out {vol.name}",
            daemon=True,
        )
        vol.out_thread.start()

    def _run_stage_out(self, vol: _Volume, delay: float) -> None:
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

    def _stage_out_attempts(self, vol: _Volume) -> None:
        assert vol.config.stage_out is not None
        dst = vol.config.stage_out.rstrip("/") + "/"
        backoff = STAGE_OUT_BACKOFF_S
        for attempt in range(1, STAGE_OUT_ATTEMPTS + 1):
            with vol.lock:
                job = vol.state.stage_out
                job.state, job.attempts, job.started_at = "running", attempt, _now()
                vol.persist()
            if not vol.mounted:
                self._drop_marker(vol)
            error: str | None = None
            result: CopyResult | None = None
            try:
                result = self._copy(vol, str(vol.data) + "/", dst, job)
                if result.ok and vol.config.mirror:
                    self._mirror(vol)
            except (StagingError, BackendError) as exc:
                error = str(exc)
            except Exception as exc:
                log.exception("stage-out of %s crashed", vol.name)
                error = f"internal error: {exc}"
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
                job.last_error = error or _summarise(result)
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

    def _mirror(self, vol: _Volume) -> None:
        """Delete remote objects under the prefix that no longer exist in the volume."""
        from plugin import s3client
        from plugin.staging.localfs import TEMP_PREFIX

        assert vol.config.stage_out is not None
        bucket, prefix = split_s3(vol.config.stage_out)
        prefix = prefix + "/" if prefix else ""
        keep: set[str] = set()

        def unreadable(rel: str, exc: OSError) -> None:
            raise BackendError(
                f"stage-out mirror of {vol.name!r}: cannot list {rel or '.'} in the volume "
                f"({exc.strerror}); nothing deleted"
            )

        with Tree.at(vol.data) as tree:
            for rel, st in tree.walk(unreadable, skip=lambda n: n.startswith(TEMP_PREFIX)):
                keep.add(rel)
                if stat.S_ISDIR(st.st_mode):
                    keep.add(rel + "/")
        client = s3client.make_s3_client(self._s3_settings(vol.config))
        doomed: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"][len(prefix) :] not in keep:
                    doomed.append(obj["Key"])
        for i in range(0, len(doomed), 1000):
            batch = [{"Key": k} for k in doomed[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
        if doomed:
            log.info("stage-out mirror of %s deleted %s remote objects", vol.name, len(doomed))

    # -- copy-up marker ------------------------------------------------------------------------

    @staticmethod
    def _ensure_marker(vol: _Volume) -> None:
        """An empty staged volume gets a marker so Docker's copy-up leaves it alone."""
        try:
            with Tree.at(vol.data) as tree:
                if tree.scandir(""):
                    return
                fd = tree.create_file(MARKER_NAME, mode=0o644)
                with open(fd, "w") as fh:
                    fh.write(MARKER_TEXT)
        except OSError as exc:
            log.warning("cannot place %s in %s: %s", MARKER_NAME, vol.data, exc)

    @staticmethod
    def _drop_marker(vol: _Volume) -> None:
        with contextlib.suppress(OSError), Tree.at(vol.data) as tree:
            with open(tree.open_file(MARKER_NAME)) as fh:
                ours = fh.read(len(MARKER_TEXT) + 1) == MARKER_TEXT
            if ours:
                tree.unlink(MARKER_NAME)

    # -- the copy core -------------------------------------------------------------------------

    def _s3_settings(self, config: StagingConfig) -> Any:
        from plugin import s3client

        return s3client.S3Settings(
            endpoint_url=config.endpoint,
            region=config.region,
            profile=config.profile,
            credentials_file=self.credentials.usable(),
            max_attempts=1,
        )

    def _copy(self, vol: _Volume, src: str | LocalLocation, dst: str, job: JobState) -> CopyResult:
        fit_checked = dst.startswith("s3://") or self._room is None

        def progress(p: Progress) -> None:
            nonlocal fit_checked
            if not fit_checked and p.state == "copying":
                # The first "copying" report comes once the source is listed, before any
                # byte is written; raising here ends the copy (and fails the job) at once.
                fit_checked = True
                self._check_fits(vol, p.bytes_total)
            with vol.lock:
                job.update(p)
                if time.monotonic() - vol.last_persist >= PERSIST_INTERVAL_S:
                    vol.persist()

        config = vol.config
        markers = config.dir_markers
        if markers is None and dst.startswith("s3://"):
            if vol.probed_markers is None:
                from plugin import s3client

                bucket, _, prefix = dst[len("s3://") :].partition("/")
                vol.probed_markers = s3client.resolve_dir_markers(
                    None, self._s3_settings(config), bucket, prefix
                )
            markers = vol.probed_markers
        options = CopyOptions(
            jobs=4,
            preserve_owner=True if config.preserve_owner else None,
            owner=config.owner,
            bwlimit=config.bwlimit,
            dir_markers=markers is not False,
            progress=progress,
            progress_interval=0.5,
            cancel=vol.cancel,
        )
        store = None
        if config.profile and self.credentials.usable():
            # Profiles from the daemon's credentials file: only the boto3 store takes a custom
            # session.
            from plugin import s3client
            from plugin.staging.boto3store import Boto3Store

            client = s3client.make_s3_client(self._s3_settings(config))
            store = Boto3Store(config.endpoint, config.region, config.profile, client=client)
        s3 = S3Options(endpoint_url=config.endpoint, region=config.region, profile=config.profile)
        return copy(src, dst, options, s3=s3, store=store)

    def _check_fits(self, vol: _Volume, needed: int) -> None:
        """BackendError if stage-in's *needed* bytes cannot fit in a size-limited volume even
        if every byte in it now were overwritten (free space plus what is in use: files copied
        by an interrupted run count once)."""
        room = self._room(vol.name) if self._room is not None else None
        if room is None:
            return
        available, used = room
        if needed > available + used:
            raise BackendError(
                f"stage-in source {vol.config.stage_in} holds {_human(needed)} ({needed} bytes), "
                f"more than volume {vol.name!r} can hold: {_human(available)} free and "
                f"{_human(used)} in use ({available + used} bytes); nothing was copied. Grow "
                "it with `stowage volume resize NAME SIZE`, or create it with a larger size="
            )


def _summarise(result: CopyResult | None) -> str:
    if result is None:
        return "failed"
    text = result.summary()
    if result.errors:
        shown = "; ".join(f"{e.path}: {e.message}" for e in result.errors[:3])
        more = f" (and {len(result.errors) - 3} more)" if len(result.errors) > 3 else ""
        text += f". Errors: {shown}{more}"
    return text
