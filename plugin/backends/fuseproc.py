"""One FUSE filesystem process per mounted volume: start, wait until live, adopt, stop.

pyfuse3 allows one mount per process, and a process outlives the daemon (its own session), so
restarting stowage breaks no running container: the next daemon adopts the process through its
pid file, which also records the process start time so a recycled pid is never mistaken for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from plugin.backends import mounts

log = logging.getLogger(__name__)


class FuseStartError(Exception):
    """The FUSE process exited or timed out before the mount was live; message has its log."""


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: str  # field 22 of /proc/PID/stat: distinguishes a recycled pid

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited; it only waits to be reaped
        return None
    return fields[19]


def mount_state(mountpoint: Path) -> str:
    """'mounted', 'dead' (in the mount table but ENOTCONN) or 'absent'. Never blocks long on
    a live mount: a stat of the mount root is answered by the kernel's attribute cache or one
    FUSE getattr."""
    if not mounts.is_mountpoint(mountpoint):
        return "absent"
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return "dead"
        raise
    return "mounted"


#: FUSE processes this daemon started, by pid: kept so they are reaped (no zombies) and their
#: exit status is known. Processes adopted after a restart are not our children.
_children: dict[int, subprocess.Popen[bytes]] = {}


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class FuseProcess:
    """The FUSE process of one volume; its files live in `state_dir`."""

    def __init__(self, state_dir: Path, mountpoint: Path) -> None:
        self.state_dir = state_dir
        self.mountpoint = mountpoint
        self.pid_file = state_dir / "fuse.pid"
        self.log_file = state_dir / "fuse.log"
        self.exit_file = state_dir / "fuse.exit"

    def recorded(self) -> ProcessRef | None:
        try:
            pid, start_time = self.pid_file.read_text().split()
            return ProcessRef(int(pid), start_time)
        except (OSError, ValueError):
            return None

    def running(self) -> ProcessRef | None:
        ref = self.recorded()
        if ref is None:
            return None
        child = _children.get(ref.pid)
        if child is not None and child.poll() is not None:  # reap it, keep its status
            self._record_exit(_children.pop(ref.pid).returncode)
        return ref if ref.alive() else None

    def state(self) -> str:
        """For Status: cheap, no S3 and no FUSE round trip unless mounted."""
        ref = self.running()
        mount = (
            mount_state(self.mountpoint)
            if ref
            else ("dead" if mounts.is_mountpoint(self.mountpoint) else "absent")
        )
        if ref and mount == "mounted":
            return "mounted"
        if self.recorded() is None and mount == "absent":
            return "not mounted"
        exit_note = ""
        with contextlib.suppress(OSError):
            exit_note = f" ({self.exit_file.read_text().strip()})"
        return f"dead: the FUSE process is gone{exit_note}; see {self.log_file}"

    def clean(self) -> None:
        """Remove what a dead process left: a stale ENOTCONN mount and its pid file."""
        ref = self.recorded()
        if ref is not None and ref.alive():
            self.stop(timeout=10)
        if mounts.is_mountpoint(self.mountpoint):
            log.info("detaching stale mount %s", self.mountpoint)
            mounts.lazy_unmount(self.mountpoint)
        self.pid_file.unlink(missing_ok=True)

    def start(self, argv: list[str], env: dict[str, str], timeout: float) -> None:
        """Start the process and return once the mount is live; FuseStartError otherwise."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists():
            os.replace(self.log_file, self.log_file.with_suffix(".log.1"))
        self.exit_file.unlink(missing_ok=True)
        read_end, write_end = os.pipe()
        try:
            with open(self.log_file, "ab") as log_out:
                proc = subprocess.Popen(
                    [*argv, "--ready-fd", str(write_end), str(self.mountpoint)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(write_end,),
                    start_new_session=True,  # survives the daemon's restart and its signals
                )
            os.close(write_end)
            write_end = -1
            start_time = None
            for _ in range(100):
                start_time = _start_time(proc.pid)
                if start_time or proc.poll() is not None:
                    break
                time.sleep(0.01)
            _children[proc.pid] = proc
            if start_time:
                self._write_pid(ProcessRef(proc.pid, start_time))
            self._wait_ready(proc, read_end, timeout)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    def _wait_ready(self, proc: subprocess.Popen[bytes], read_end: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill(proc)
                raise FuseStartError(
                    f"the FUSE process did not mount {self.mountpoint} within {timeout:.0f}s; "
                    f"its log ({self.log_file}):\n{tail(self.log_file)}"
                )
            ready, _, _ = select.select([read_end], [], [], min(remaining, 0.5))
            if ready and os.read(read_end, 64).startswith(b"ready"):
                return
            if ready or proc.poll() is not None:  # EOF on the pipe: it exited
                code = proc.wait(timeout=10)
                _children.pop(proc.pid, None)
                self.pid_file.unlink(missing_ok=True)
                raise FuseStartError(
                    f"the FUSE process exited with status {code} before mounting; "
                    f"its log ({self.log_file}):\n{tail(self.log_file)}"
                )

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        _children.pop(proc.pid, None)
        with contextlib.suppress(OSError):
            mounts.lazy_unmount(self.mountpoint)
        self.pid_file.unlink(missing_ok=True)

    def _write_pid(self, ref: ProcessRef) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{ref.pid} {ref.start_time}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.pid_file)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM: the process uploads dirty files, unmounts and exits. Returns its exit
        status when known (only if this daemon started it)."""
        ref = self.recorded()
        status: int | None = None
        child = _children.pop(ref.pid, None) if ref is not None else None
        if ref is not None and (child is not None or ref.alive()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ref.pid, signal.SIGTERM)
            if child is not None:
                try:
                    status = child.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.error("FUSE process %s did not exit in %ss; killing it", ref.pid, timeout)
                    child.kill()
                    status = child.wait()
            else:
                deadline = time.monotonic() + timeout
                while ref.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if ref.alive():
                    log.error("FUSE process %s did not exit in %ss; killing it", ref.pid, timeout)
                    os.kill(ref.pid, signal.SIGKILL)
        if status is not None:
            self._record_exit(status)
        with contextlib.suppress(OSError):
            mounts.lazy_unmount(self.mountpoint)
        self.pid_file.unlink(missing_ok=True)
        return status

    def _record_exit(self, status: int) -> None:
        with contextlib.suppress(OSError):
            self.exit_file.write_text(f"last exit status {status}\n")
