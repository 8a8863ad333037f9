"""Helpers for the chaos tier: seeded trees, checksummed comparisons, a daemon whose every FUSE
process, mount and temp directory is gone after the test, and a loop-mounted ext4 to fill.

Every loop here is bounded twice, by a count and by a deadline (`Budget`), so a fault that makes
the product hang fails the test instead of the CI job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import s3servers
from harness.daemon import StowageDaemon, stowage_executable
from harness.plugin_client import PluginClient
from harness.s3servers import S3Server

from plugin.backends import mounts
from plugin.backends.fuseproc import FuseProcess
from plugin.names import encode_name

MiB = 1 << 20
TEMP_PREFIX = ".stowage"  # the copy core's temporary and journal files start with this
MARKER = ".stowage-staged"
#: Seeds used in this session, printed in pytest's summary (see conftest.py).
SEEDS: list[tuple[str, int]] = []


def new_mount_id() -> str:
    return secrets.token_hex(32)


class Budget:
    """A deadline for a whole chaos loop: `left()` seconds remain, `check()` fails past it."""

    def __init__(self, seconds: float, what: str) -> None:
        self.what = what
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise AssertionError(f"{self.what}: time budget of {self.seconds:.0f}s exceeded")


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- trees and checksums --------------------------------------------------------------------------


def content(seed: int, name: str, size: int) -> bytes:
    """Deterministic bytes for file `name`: any partial or mixed copy has another checksum."""
    return random.Random(f"{seed}:{name}").randbytes(size)


def make_tree(
    root: Path, rng: random.Random, big: int, small: int, big_mib: tuple[int, int] = (2, 6)
) -> dict[str, str]:
    """`big` files of 2-6 MiB (`big_mib`) and `small` files of 0-64 KiB in a few directories;
    returns {relative path: sha256}."""
    seed = rng.randrange(1 << 30)
    sizes: dict[str, int] = {}
    for i in range(big):
        sizes[f"big/b{i:02d}.bin"] = rng.randrange(big_mib[0] * MiB, big_mib[1] * MiB)
    for i in range(small):
        sizes[f"small/d{i % 4}/s{i:03d}.dat"] = rng.randrange(0, 64 << 10)
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(seed, rel, size))
    return digest_tree(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _skipped(rel: str) -> bool:
    return any(part.startswith(TEMP_PREFIX) for part in rel.split("/"))


def digest_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file, skipping stowage's temp files and marker."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if not _skipped(rel) and not path.is_symlink():
                out[rel] = sha256_file(path)
    return out


def temp_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if _skipped(str(p.relative_to(root)))
    )


def digest_bucket(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    """{key relative to prefix: sha256} of every object under `prefix/` ("": the bucket)."""
    client = server.client()
    out: dict[str, str] = {}
    start = prefix + "/" if prefix else ""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
    for page in pages:
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(start) :]] = hashlib.sha256(body).hexdigest()
    return out


def upload_tree(server: S3Server, bucket: str, prefix: str, root: Path) -> None:
    client = server.client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root)}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def assert_no_partial(found: dict[str, str], expected: dict[str, str], where: str) -> None:
    """Every file visible under its final name is whole: absent or equal to the source."""
    torn = {rel: sha for rel, sha in found.items() if expected.get(rel) != sha}
    assert not torn, f"{where}: partial or foreign files visible under final names: {torn}"


# -- processes ------------------------------------------------------------------------------------


def stowage_cmd(*args: str) -> list[str]:
    return [*stowage_executable(), *args]


class ProgressWatcher:
    """Reads `stowage cp --progress` output ("\\r[###...]  42.0% ...") from a pipe."""

    PCT = re.compile(rb"\]\s*([0-9.]+)%")

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.pct = 0.0
        self.text = b""
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := self._stream.read1(4096):  # type: ignore[attr-defined]
            self.text = (self.text + chunk)[-4096:]
            found = self.PCT.findall(self.text)
            if found:
                self.pct = float(found[-1])

    def join(self) -> None:
        self._thread.join(10)
        self._stream.close()


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


# -- the daemon -----------------------------------------------------------------------------------


@dataclass
class Chaos:
    """One test's world: a temp dir (removed at the end), an optional private rclone server, a
    stowage daemon on `root`, and everything they mounted."""

    base: Path
    rng: random.Random
    seed: int
    server: S3Server | None = None
    daemon: StowageDaemon | None = None
    #: Mounts the test owns and unmounts itself (the loop-mounted ext4 under `root`).
    keep_mounted: set[Path] = field(default_factory=set)

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def allowed(self) -> Path:
        return self.base / "allowed"

    def start_server(self) -> S3Server:
        self.server = S3Server(kind="rclone", workdir=self.base / "s3")
        self.server.workdir.mkdir(exist_ok=True)
        self.server.start()
        return self.server

    def start_daemon(self) -> StowageDaemon:
        if self.daemon is None:
            self.allowed.mkdir(exist_ok=True)
            self.root.mkdir(exist_ok=True)
            self.daemon = StowageDaemon(
                socket_path=self.base / "s.sock",
                root=self.root,
                log_path=self.base / "stowage.log",
                allowed_paths=(self.allowed,),
                env=s3servers.aws_env({}),
            )
        self.daemon.start()
        return self.daemon

    def client(self) -> PluginClient:
        assert self.daemon is not None
        return self.daemon.client()

    def crash_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()

    def data_dir(self, name: str) -> Path:
        return self.root / "volumes" / encode_name(name) / "data"

    def status(self, name: str) -> dict[str, Any]:
        reply = self.client().get(name)
        assert not reply.get("Err"), reply
        status: dict[str, Any] = reply["Volume"]["Status"]
        return status

    def s3_opts(self, **extra: str) -> dict[str, str]:
        assert self.server is not None
        return {"endpoint": self.server.endpoint, "dir_markers": "false", **extra}

    def aws_env(self) -> dict[str, str]:
        return s3servers.aws_env()

    def log_tail(self) -> str:
        return self.daemon.log_text()[-6000:] if self.daemon else ""

    def teardown(self) -> list[str]:
        """Stop everything, in an order that never leaves a mount behind; returns problems."""
        problems: list[str] = []
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.stop(timeout=20)
            with contextlib.suppress(Exception):
                self.daemon.kill()
        s3_state = self.root / "s3"
        if s3_state.is_dir():
            for state_dir in s3_state.iterdir():
                with contextlib.suppress(Exception):
                    FuseProcess(state_dir, self.root / "mounts" / state_dir.name).stop(timeout=20)
        if self.server is not None:
            self.server.stop()
        for path in sorted(mounts.mountpoints(), key=len, reverse=True):
            if Path(path).is_relative_to(self.base) and Path(path) not in self.keep_mounted:
                try:
                    mounts.lazy_unmount(Path(path))
                except OSError as exc:
                    problems.append(f"cannot unmount {path}: {exc}")
        return problems


@contextlib.contextmanager
def chaos_world(rng: random.Random, seed: int) -> Iterator[Chaos]:
    base = Path(tempfile.mkdtemp(prefix="stw-chaos-", dir="/tmp"))
    world = Chaos(base=base, rng=rng, seed=seed)
    try:
        yield world
    finally:
        problems = world.teardown()
        still = [m for m in mounts.mountpoints() if Path(m).is_relative_to(base)]
        if not still:
            shutil.rmtree(base, ignore_errors=True)
        if problems or still:
            raise AssertionError(f"chaos teardown left {still}: {problems}")


# -- a small ext4 on a loop device ----------------------------------------------------------------


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_ext4(image: Path, mountpoint: Path, size_mib: int) -> Iterator[Path]:
    """`size_mib` ext4 (no root reserve) on a loop device mounted at `mountpoint`; unmounted and
    detached afterwards, and `losetup -j IMAGE` checked empty."""
    with open(image, "wb") as fh:
        fh.truncate(size_mib * MiB)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    device = _run("losetup", "-f", "--show", str(image))
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "ext4", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            for path in sorted(mounts.mountpoints(), key=len, reverse=True):
                if Path(path).is_relative_to(mountpoint) and Path(path) != mountpoint:
                    with contextlib.suppress(OSError):
                        mounts.lazy_unmount(Path(path))
            busy = (
                mounts.is_mountpoint(mountpoint)
                and subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode
            )
            if busy:
                subprocess.run(["umount", "-l", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        attached = _run("losetup", "-j", str(image))
        image.unlink(missing_ok=True)
        assert not attached, f"loop device still attached: {attached}"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
