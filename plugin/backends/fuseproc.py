"""One FUSE filesystem process per mounted volume: start, wait until live, adopt, stop.

pyfuse3 allows one mount per process, and a process outlives the daemon (its own session), so
restarting stowage breaks no running container: the next daemon adopts the process through its
pid file, which also records the process start time so a recycled pid is never mistaken for it.

FUSE processes are forked by a launcher (plugin.fusefs.launcher), a process of the daemon's
that has already imported the filesystem's modules: a fresh interpreter spends ~300 ms on them
before it can mount. A forked process is a FUSE process like a spawned one (own session, pid
file, `--ready-fd`), only its parent differs (the launcher reaps it and records its exit
status). If the launcher cannot be used, the process is spawned as before.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from plugin.backends import mounts
from plugin.logs import child_log_arguments

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


class _Child(Protocol):
    """What start() needs of the process: a Popen, or a launcher's child (_Forked)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class _Forked:
    """A FUSE process forked by the launcher: not our child, so its liveness comes from
    /proc (with the start time, so a recycled pid does not count) and its exit status from
    the file the launcher writes when it reaps it."""

    def __init__(self, pid: int, exit_file: Path) -> None:
        self.pid = pid
        self.exit_file = exit_file
        self.start_time = _start_time(pid)

    def _alive(self) -> bool:
        return self.start_time is not None and _start_time(self.pid) == self.start_time

    def _status(self) -> int:
        # The launcher writes the status right after reaping; give it a moment.
        for _ in range(50):
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(self.exit_file.read_text().split()[-1])
            time.sleep(0.01)
        return -1

    def poll(self) -> int | None:
        return None if self._alive() else self._status()

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._alive():
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.01)
        return self._status()

    def kill(self) -> None:
        if self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class LauncherError(Exception):
    """The launcher could not fork a FUSE process; spawn one instead."""


#: The command line of a FUSE process; the launcher runs the same `main` with the rest.
FUSEFS_COMMAND = [sys.executable, "-m", "plugin.fusefs"]
#: File name, in a volume's state directory, of its FUSE process's counters.
STATS_FILE = "fuse.stats.json"
#: Seconds a Mount waits for a starting launcher (its imports) before spawning instead.
LAUNCHER_START_TIMEOUT_S = 10.0
#: Seconds for the launcher to answer a request (a fork: milliseconds).
LAUNCHER_REPLY_TIMEOUT_S = 10.0
#: After the launcher failed, spawn for this long before trying a new one.
LAUNCHER_RETRY_S = 30.0


class Launcher:
    """The daemon's side of the fork server (see plugin.fusefs.launcher): started on first
    use (or by `start`), talked to over a SOCK_SEQPACKET socket pair, one request at a
    time. It exits when its socket closes, i.e. when the daemon exits; the FUSE processes it
    forked keep running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._failed_at: float | None = None
        #: False: never use a launcher (every FUSE process is spawned).
        self.enabled = os.environ.get("STOWAGE_FUSE_LAUNCHER", "1") != "0"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the launcher if it is not running (returns at once; its imports go on in
        the background)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if not self.enabled or (self._proc is not None and self._proc.poll() is None):
            return
        if self._failed_at is not None and time.monotonic() - self._failed_at < LAUNCHER_RETRY_S:
            return
        self._discard_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [*FUSEFS_COMMAND[:2], "plugin.fusefs.launcher", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # the daemon's signals are not its children's
            )
        except OSError as exc:
            ours.close()
            log.warning("cannot start the FUSE launcher: %s", exc)
            self._failed_at = time.monotonic()
            return
        finally:
            theirs.close()
        self._sock = ours
        self._ready = False
        log.debug("FUSE launcher started (pid %d)", self._proc.pid)

    def _discard_locked(self) -> None:
        """Forget the launcher: close its socket (it exits) and reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is not None:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def ready(self) -> bool:
        """The launcher has done its imports (its greeting was read)."""
        return self._ready

    def wait_ready(self, timeout: float) -> bool:
        """Wait at most *timeout* for a started launcher to finish its imports, so that the
        Mount that follows forks at once instead of waiting for them; False if it is not
        running or not ready in time (a Mount then waits, or spawns, as without this)."""
        with self._lock:
            sock = self._sock
            if sock is None or self._ready:
                return self._ready
            try:
                hello = self._recv(sock, timeout)
            except TimeoutError:
                return False  # still importing; the greeting is read by the next fork
            except (OSError, LauncherError, ValueError) as exc:
                hello = {"error": str(exc)}
            if "launcher" not in hello:
                with contextlib.suppress(LauncherError):
                    self._replace_locked(f"no greeting from the launcher: {hello!r}")
                return False
            self._ready = True
            return True

    def stop(self) -> None:
        """Close the launcher (what the daemon's exit does); FUSE processes stay."""
        with self._lock:
            self._discard_locked()
            self._failed_at = None

    def _recv(self, sock: socket.socket, timeout: float) -> dict[str, Any]:
        sock.settimeout(timeout)
        data = sock.recv(1 << 16)
        if not data:
            raise LauncherError("the launcher exited")
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise LauncherError(f"unexpected answer {data[:100]!r}")
        return reply

    def fork(
        self,
        args: list[str],
        env: Mapping[str, str],
        mountpoint: Path,
        fds: tuple[int, int],
        exit_file: Path,
    ) -> int:
        """Have the launcher fork a FUSE process for `python -m plugin.fusefs ARGS` (it adds
        `--ready-fd` and the mountpoint); *fds* are the readiness pipe's write end and the
        log file. Returns its pid; LauncherError if the launcher cannot do it."""
        with self._lock:
            if not self.enabled:
                raise LauncherError("disabled")
            if self._proc is not None and self._proc.poll() is not None:
                self._replace_locked(f"it exited with status {self._proc.returncode}")
            self._start_locked()
            sock = self._sock
            if sock is None:
                raise LauncherError("not running")
            try:
                if not self._ready:
                    hello = self._recv(sock, LAUNCHER_START_TIMEOUT_S)
                    if "launcher" not in hello:
                        raise LauncherError(f"unexpected greeting {hello!r}")
                    self._ready = True
                request = {
                    "args": args,
                    "env": dict(env),
                    "mountpoint": str(mountpoint),
                    "exit_file": str(exit_file),
                }
                sock.settimeout(LAUNCHER_REPLY_TIMEOUT_S)
                sock.sendmsg(
                    [json.dumps(request).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                )
                reply = self._recv(sock, LAUNCHER_REPLY_TIMEOUT_S)
                if "pid" not in reply:
                    raise LauncherError(str(reply.get("error", reply)))
                return int(reply["pid"])
            except (OSError, ValueError, LauncherError) as exc:
                self._replace_locked(str(exc) or type(exc).__name__)

    def _replace_locked(self, why: str) -> NoReturn:
        """The launcher is dead, hung or confused: drop it and start another for the next
        Mount (this one spawns, so it does not wait for the new one's imports). One that
        never got as far as greeting us is not restarted for a while: a crash loop would cost
        a process start per Mount."""
        crashed = not self._ready
        self._discard_locked()
        if crashed:
            self._failed_at = time.monotonic()
        self._start_locked()
        raise LauncherError(why)


#: The daemon's launcher (one per daemon process).
launcher = Launcher()


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
        #: The command line it was started with, NUL-separated like /proc/PID/cmdline (a
        #: forked process's own cmdline is the launcher's). Never holds credentials.
        self.argv_file = state_dir / "fuse.argv"
        #: Its counters for the daemon's metrics (plugin.fusefs.stats), rewritten every few
        #: seconds while it runs.
        self.stats_file = state_dir / STATS_FILE

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
        """Start the process and return once the mount is live; FuseStartError otherwise.
        `python -m plugin.fusefs` is forked by the launcher when it can be, else spawned."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists():
            os.replace(self.log_file, self.log_file.with_suffix(".log.1"))
        self.exit_file.unlink(missing_ok=True)
        if argv[: len(FUSEFS_COMMAND)] == FUSEFS_COMMAND:
            argv = [*argv, "--stats-file", str(self.stats_file), *child_log_arguments()]
        self.argv_file.write_text("\0".join([*argv, str(self.mountpoint)]))
        read_end, write_end = os.pipe()
        try:
            proc: _Child | None = None
            start_time = None
            with open(self.log_file, "ab") as log_out:
                if argv[: len(FUSEFS_COMMAND)] == FUSEFS_COMMAND and launcher.enabled:
                    try:
                        pid = launcher.fork(
                            argv[len(FUSEFS_COMMAND) :],
                            env,
                            self.mountpoint,
                            (write_end, log_out.fileno()),
                            self.exit_file,
                        )
                    except LauncherError as exc:
                        log.warning("FUSE launcher unusable (%s); spawning the process", exc)
                    else:
                        forked = _Forked(pid, self.exit_file)
                        proc, start_time = forked, forked.start_time
                if proc is None:
                    popen = subprocess.Popen(
                        [*argv, "--ready-fd", str(write_end), str(self.mountpoint)],
                        stdin=subprocess.DEVNULL,
                        stdout=log_out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        pass_fds=(write_end,),
                        start_new_session=True,  # survives the daemon's restart and its signals
                    )
                    proc = popen
                    for _ in range(100):
                        start_time = _start_time(popen.pid)
                        if start_time or popen.poll() is not None:
                            break
                        time.sleep(0.01)
                    _children[popen.pid] = popen
            os.close(write_end)
            write_end = -1
            if start_time:
                self._write_pid(ProcessRef(proc.pid, start_time))
            self._wait_ready(proc, read_end, timeout)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    def _wait_ready(self, proc: _Child, read_end: int, timeout: float) -> None:
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

    def _kill(self, proc: _Child) -> None:
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
