"""Mounting `python -m plugin.fusefs` for tests: start, wait for readiness, tear down."""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.s3servers import S3Server, aws_env, die_with_parent

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def fuse_unusable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found (apt-get install fuse3)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3/trio not installed: {exc}"
    return None


def unmount(path: Path, *, lazy: bool = False) -> bool:
    if not os.path.ismount(path):
        return True
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path
    server: S3Server
    bucket: str
    prefix: str
    client: Any

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """Clean unmount (the process uploads dirty files, then exits); its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        unmount(self.path, lazy=True)
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        """Forgiving teardown for the error path: lazy unmount, then terminate, then kill."""
        unmount(self.path, lazy=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_mount(
    server: S3Server,
    bucket: str,
    mountpoint: Path,
    workdir: Path,
    *,
    prefix: str = "",
    extra: list[str] | None = None,
    cache_dir: Path | None = None,
    env: dict[str, str] | None = None,
    server_default_markers: bool = False,
) -> Mount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or workdir / "cache"
    log_path = workdir / f"fusefs-{mountpoint.name}.log"
    rfd, wfd = os.pipe()
    args = [
        sys.executable,
        "-m",
        "plugin.fusefs",
        "--endpoint",
        server.endpoint,
        "--bucket",
        bucket,
        "--cache-dir",
        str(cache_dir),
        "--ready-fd",
        str(wfd),
        "--metadata-ttl",
        "1",
        "--log-level",
        "debug",
        "--connect-timeout",
        "2",
        "--max-attempts",
        "2",
    ]
    if prefix:
        args += ["--prefix", prefix]
    if not server.supports_dir_markers and not server_default_markers:
        args.append("--no-dir-markers")
    args += [*(extra or []), str(mountpoint)]
    with log_path.open("ab") as log:
        # SIGTERM on the test's death: the filesystem flushes, unmounts and exits by itself.
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(wfd,),
            env=aws_env() if env is None else env,
            cwd=REPO,
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
        )
    os.close(wfd)
    mount = Mount(
        path=mountpoint,
        proc=proc,
        cache_dir=cache_dir,
        log_path=log_path,
        server=server,
        bucket=bucket,
        prefix=prefix,
        client=server.client(),
    )
    try:
        ready, _, _ = select.select([rfd], [], [], 30)
        answer = os.read(rfd, 64) if ready else b""
        if answer != b"ready\n":
            proc.poll()
            pytest.fail(f"fusefs did not become ready (exit {proc.returncode}):\n{mount.log()}")
        deadline = time.monotonic() + 10
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"mountpoint never appeared:\n{mount.log()}")
            time.sleep(0.05)
    except BaseException:
        mount.cleanup()
        raise
    finally:
        os.close(rfd)
    return mount


MountFactory = Callable[..., Mount]
