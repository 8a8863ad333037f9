"""Runs `stowage serve` as a real process for socket-level and end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.plugin_client import PluginClient


def stowage_executable() -> list[str]:
    """The installed console script, else `python -m plugin` from this interpreter."""
    exe = Path(sys.executable).with_name("stowage")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("stowage")
    return [found] if found else [sys.executable, "-m", "plugin"]


def socket_accepts(path: str | Path, timeout: float = 0.5) -> bool:
    """Whether something listens on the unix socket `path` (connect, then close)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class StowageDaemon:
    """One `stowage serve` process; logs (stdout+stderr) go to `log_path`.

    Every handled API request is logged at INFO as `request /<Endpoint> ...`, so tests can count
    calls the way moby's own test plugin does (see `count_requests`).
    """

    def __init__(
        self,
        socket_path: Path,
        root: Path,
        log_path: Path,
        allowed_paths: tuple[Path, ...] = (),
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.root = root
        self.log_path = log_path
        self.allowed_paths = allowed_paths
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[PluginClient] = []

    def command(self) -> list[str]:
        cmd = [
            *stowage_executable(),
            "serve",
            "--socket",
            str(self.socket_path),
            "--root",
            str(self.root),
            "--log-level",
            "debug",
        ]
        for allowed in self.allowed_paths:
            cmd += ["--allowed-path", str(allowed)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"stowage exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            if socket_accepts(str(self.socket_path)):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"stowage socket not ready in {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, as Docker and systemd do; SIGKILL if it outlives `timeout`."""
        self.close_clients()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group (gunicorn master and worker): a crash."""
        self.close_clients()
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # The gunicorn worker may outlive the master briefly, its socket still accepting: wait
        # until the whole group is gone, or a restart could be "ready" on the dying worker.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise RuntimeError(f"stowage process group {self.proc.pid} survived SIGKILL")

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> PluginClient:
        """A new client; closed by stop() and kill(), so tests need not track it."""
        client = PluginClient(str(self.socket_path))
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count_requests(self, endpoint: str) -> int:
        """How many times `/<endpoint>` (e.g. "VolumeDriver.Mount") was called, across restarts."""
        needle = f"request /{endpoint} "
        return sum(1 for line in self.log_text().splitlines() if needle in line + " ")
