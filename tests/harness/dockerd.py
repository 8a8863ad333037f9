"""A private `dockerd` (with its own `containerd`) for the end-to-end tier.

Why a private daemon: the e2e tests restart dockerd, count plugin calls and delete every
container and volume they see, none of which may touch a user's real Docker. Everything lives
under one short temporary directory (`base`): data-root, exec-root, API socket, pidfile, logs,
CLI config. `stop()` leaves nothing running or mounted, even after a failed test.

Why our own containerd instead of dockerd's supervised one: dockerd silently attaches to the
system containerd whenever `/run/containerd/containerd.sock` exists, which would mix our
containers into a user's containerd. Running our own also mirrors production (docker.service
plus containerd.service), where restarting dockerd leaves containerd running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from harness.daemon import socket_accepts

log = logging.getLogger(__name__)

DOCKERD = "/usr/sbin/dockerd"
DEFAULT_TIMEOUT = 60.0
# A unix socket path must fit in sun_path (108 bytes, NUL included).
MAX_SOCKET_PATH = 107
MNT_DETACH = 2
# Where containerd-shim-runc-v2 creates its sockets whatever containerd's state dir is.
SHIM_SOCKET_DIRS = (Path("/run/containerd/s"), Path("/run/containerd"))
T = TypeVar("T")


class DockerCommandError(RuntimeError):
    """A docker CLI call exited non-zero; keeps the output so a failing test shows why."""

    def __init__(self, cmd: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(cmd)!r} exited {returncode}\nstdout: {stdout[-2000:]}\n"
            f"stderr: {stderr[-2000:]}"
        )


class DockerdStartError(RuntimeError):
    """dockerd or containerd did not come up; the message carries the log tail."""


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `predicate` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _unescape_mountinfo(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path` (this mount namespace), deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = _unescape_mountinfo(line.split()[4])
            if mount_point == root or mount_point.startswith(root.rstrip("/") + "/"):
                found.append(mount_point)
    return sorted(found, key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_under(path: Path | str, timeout: float = 10.0) -> list[str]:
    """Lazily unmount everything at or below `path`; returns what is still mounted.

    Lazy (MNT_DETACH) because a leftover container process or open file must not make
    teardown hang or fail; the kernel finishes the unmount when the last user goes away.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    deadline = time.monotonic() + timeout
    remaining = mounts_under(path)
    while remaining and time.monotonic() < deadline:
        for mount_point in remaining:
            if libc.umount2(os.fsencode(mount_point), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                log.debug("umount2(%s): %s", mount_point, os.strerror(err))
        remaining = mounts_under(path)
        if remaining:
            time.sleep(0.1)
    for mount_point in remaining:
        log.warning("still mounted after teardown: %s", mount_point)
    return remaining


def _proc_ppids() -> dict[int, int]:
    """pid -> parent pid for every visible process."""
    ppids: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        ppids[int(entry)] = int(fields[1])
    return ppids


def pids_with_cmdline_containing(needle: str) -> list[int]:
    """Processes whose command line mentions `needle` (our unique base dir), except us."""
    wanted = needle.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if wanted in cmdline:
            pids.append(int(entry))
    return pids


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` plus all their descendants (container processes are children of the shim)."""
    ppids = _proc_ppids()
    result = set(pids)
    changed = True
    while changed:
        changed = False
        for pid, ppid in ppids.items():
            if ppid in result and pid not in result:
                result.add(pid)
                changed = True
    return sorted(result)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL `pids`; returns those still alive after `timeout`."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "<no log>"


def dockerd_major_version(binary: str = DOCKERD) -> int:
    """Major version of the dockerd binary ("Docker version 20.10.24+dfsg1, ..." -> 20)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return int(out.split("version", 1)[1].strip().split(".", 1)[0])


class Dockerd:
    """One private dockerd + containerd pair rooted at `base`.

    Use as a context manager or call `start()` / `stop()`. `docker()` runs the CLI against it.
    """

    #: Prepended to the containerd and dockerd command lines, e.g. `nsenter` into a namespace
    #: of a test node (tests/swarm); both must share the mount namespace of their containers.
    launch_prefix: tuple[str, ...] = ()

    def __init__(
        self,
        base: Path | None = None,
        *,
        storage_drivers: tuple[str, ...] | None = None,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
        dockerd_binary: str = DOCKERD,
        docker_cli: str | None = None,
        remove_base: bool = True,
    ) -> None:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="stw-d-", dir="/tmp"))
        self.base = base
        self.data_root = base / "data"
        self.exec_root = base / "exec"
        self.host_socket = base / "docker.sock"
        self.containerd_dir = self.exec_root / "ctd"
        self.containerd_socket = self.containerd_dir / "ctd.sock"
        self.pidfile = base / "dockerd.pid"
        self.log_path = base / "dockerd.log"
        self.containerd_log_path = base / "containerd.log"
        self.config_path = base / "daemon.json"
        self.containerd_config_path = base / "containerd.toml"
        self.cli_config = base / "cli"
        # Unique, so leftovers are recognisable and removable (`_remove_cgroups`).
        self.cgroup_parent = "stowage-e2e-" + hashlib.sha256(str(base).encode()).hexdigest()[:12]
        env_drivers = os.environ.get("STOWAGE_E2E_STORAGE_DRIVER")
        self.storage_drivers = storage_drivers or (
            (env_drivers,) if env_drivers else ("overlay2", "vfs")
        )
        self.storage_driver: str | None = None
        self.log_level = log_level
        self.extra_args = extra_args
        self.dockerd_binary = dockerd_binary
        self.docker_cli = (
            docker_cli
            or os.environ.get("STOWAGE_E2E_DOCKER_CLI")
            or shutil.which("docker")
            or "docker"
        )
        self.remove_base = remove_base
        self.proc: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        for sock in (self.host_socket, self.containerd_socket):
            if len(str(sock)) > MAX_SOCKET_PATH:
                raise ValueError(f"socket path too long for AF_UNIX: {sock}")

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start containerd (if needed) and dockerd; try each storage driver in turn."""
        for d in (self.data_root, self.exec_root, self.containerd_dir, self.cli_config):
            d.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        errors = []
        try:
            self._start_containerd(timeout=min(timeout, 30.0))
            for driver in self.storage_drivers:
                try:
                    self._start_dockerd(driver, timeout)
                    self.storage_driver = driver
                    return
                except DockerdStartError as exc:
                    log.warning("dockerd with storage driver %s failed: %s", driver, exc)
                    errors.append(f"[{driver}] {exc}")
                    self._stop_dockerd()
                    unmount_under(self.data_root)
        except BaseException:
            self._stop_quietly()
            raise
        self._stop_quietly()
        raise DockerdStartError("\n".join(errors))

    def restart(
        self, timeout: float = DEFAULT_TIMEOUT, while_down: Callable[[], object] | None = None
    ) -> None:
        """SIGTERM dockerd, wait for it, start it again on the same dirs and storage driver.

        `while_down` runs between the two, e.g. to snapshot plugin calls made by the shutdown
        apart from those made at boot. containerd keeps running, as under systemd.
        """
        driver = self.storage_driver
        assert driver is not None, "restart() before a successful start()"
        self._stop_dockerd()
        if while_down is not None:
            while_down()
        self._start_dockerd(driver, timeout)

    def stop(self) -> None:
        """Stop everything and leave nothing behind. Safe to call twice or after a failure."""
        problems = []
        self._stop_dockerd()
        self._stop_process(self.containerd, "containerd", term_timeout=15.0)
        self.containerd = None
        # Shims (and their containers) outlive containerd by design; they name our socket.
        leftovers = with_descendants(pids_with_cmdline_containing(f"{self.base}/"))
        if leftovers:
            log.warning("killing leftover processes %s", leftovers)
            if still := kill_and_wait(leftovers):
                problems.append(f"processes survived SIGKILL: {still}")
        if still_mounted := unmount_under(self.base):
            problems.append(f"still mounted: {still_mounted}")
        self._remove_cgroups()
        # Shims put their sockets in the host-wide /run/containerd/s; drop it only if empty.
        for d in SHIM_SOCKET_DIRS:
            with contextlib.suppress(OSError):
                d.rmdir()
        if self.remove_base and not still_mounted and self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)
        if problems:
            raise RuntimeError("dockerd teardown incomplete: " + "; ".join(problems))

    def _stop_quietly(self) -> None:
        """stop() on a failed start: the start error matters more than teardown leftovers."""
        try:
            self.stop()
        except RuntimeError as exc:
            log.error("%s", exc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- CLI ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"unix://{self.host_socket}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for any Docker client (CLI, docker-compose) aimed at this daemon."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"}
        }
        env.update(
            DOCKER_HOST=self.host,
            DOCKER_CONFIG=str(self.cli_config),
            DOCKER_CLI_HINTS="false",
        )
        env.update(extra or {})
        return env

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker <args>` against this daemon; bounded by `timeout` seconds."""
        cmd = [self.docker_cli, *args]
        try:
            result = subprocess.run(
                cmd,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"{' '.join(cmd)!r} did not finish in {timeout}s; dockerd log tail:\n"
                f"{_tail(self.log_path, 2000)}"
            ) from exc
        if check and result.returncode != 0:
            raise DockerCommandError(cmd, result.returncode, result.stdout, result.stderr)
        return result

    def docker_json(self, *args: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """`docker <args>` whose stdout is one JSON document (e.g. `--format '{{json .}}'`)."""
        return json.loads(self.docker(*args, timeout=timeout).stdout)

    def log_text(self) -> str:
        return _tail(self.log_path, 1 << 30)

    # -- internals ---------------------------------------------------------------------------

    def _write_configs(self) -> None:
        config: dict[str, Any] = {}
        if dockerd_major_version(self.dockerd_binary) < 23:
            # dockerd < 23 otherwise writes a libtrust key to /etc/docker/key.json.
            config["deprecated-key-path"] = str(self.base / "key.json")
        self.config_path.write_text(json.dumps(config))
        ctd_root = self.data_root / "containerd"
        self.containerd_config_path.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{ctd_root}"',
                    f'state = "{self.containerd_dir / "state"}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.containerd_socket}"',
                    "[ttrpc]",
                    f'  address = "{self.containerd_socket}.ttrpc"',
                    "[debug]",
                    '  address = ""',
                    "[metrics]",
                    '  address = ""',
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f'  path = "{ctd_root / "opt"}"',
                    "",
                ]
            )
        )

    def _start_containerd(self, timeout: float) -> None:
        if self.containerd is not None and self.containerd.poll() is None:
            return
        binary = shutil.which("containerd") or "/usr/bin/containerd"
        with open(self.containerd_log_path, "ab") as logf:
            self.containerd = subprocess.Popen(
                [*self.launch_prefix, binary, "--config", str(self.containerd_config_path)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.containerd

        def ready() -> bool:
            if proc.poll() is not None:
                raise DockerdStartError(
                    f"containerd exited {proc.returncode}:\n{_tail(self.containerd_log_path)}"
                )
            return socket_accepts(self.containerd_socket)

        try:
            wait_until(ready, timeout, what="containerd socket")
        except TimeoutError as exc:
            raise DockerdStartError(f"{exc}\n{_tail(self.containerd_log_path)}") from exc

    def _dockerd_command(self, storage_driver: str) -> list[str]:
        return [
            *self.launch_prefix,
            self.dockerd_binary,
            "--config-file", str(self.config_path),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--host", self.host,
            "--pidfile", str(self.pidfile),
            "--containerd", str(self.containerd_socket),
            "--storage-driver", storage_driver,
            "--log-level", self.log_level,
            "--bridge", "none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", f"/{self.cgroup_parent}",
            *self.extra_args,
        ]  # fmt: skip

    def _start_dockerd(self, storage_driver: str, timeout: float) -> None:
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== starting dockerd ({storage_driver}) =====\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self._dockerd_command(storage_driver),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise DockerdStartError(
                    f"dockerd exited {proc.returncode}:\n{_tail(self.log_path)}"
                )
            if not self.host_socket.exists():
                return False
            info = self.docker("info", "--format", "{{.Driver}}", check=False, timeout=10)
            return info.returncode == 0 and info.stdout.strip() == storage_driver

        try:
            wait_until(ready, timeout, interval=0.1, what="dockerd to answer `docker info`")
        except TimeoutError as exc:
            raise DockerdStartError(f"{exc}\n{_tail(self.log_path)}") from exc

    def _stop_dockerd(self, term_timeout: float = 30.0) -> None:
        self._stop_process(self.proc, "dockerd", term_timeout)
        self.proc = None

    @staticmethod
    def _stop_process(proc: subprocess.Popen[bytes] | None, name: str, term_timeout: float) -> None:
        """SIGTERM (graceful: dockerd stops containers and unmounts), SIGKILL past the timeout."""
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(term_timeout)
                return
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %ss; killing it", name, term_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            # Stuck in the kernel (D state); `stop()` still unmounts and reports it.
            log.error("%s (pid %s) survived SIGKILL for 10s", name, proc.pid)

    def _remove_cgroups(self, timeout: float = 5.0) -> None:
        """rmdir our (empty) cgroup parents; cgroupfs dirs vanish only once their tasks exit."""
        roots = [Path("/sys/fs/cgroup")]
        roots += [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
        for root in roots:
            top = root / self.cgroup_parent
            if not top.is_dir():
                continue
            try:
                wait_until(functools.partial(self._rmdir_tree, top), timeout, 0.1, f"rmdir {top}")
            except TimeoutError:
                log.warning("could not remove cgroup %s", top)

    @staticmethod
    def _rmdir_tree(top: Path) -> bool:
        """rmdir `top` and its subdirectories bottom-up; never deletes files. True if gone."""
        if not top.is_dir():
            return True
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        return not top.exists()
