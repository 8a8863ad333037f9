"""Soak through the real dockerd: 50 `docker run`s on 10 stowage volumes, 5 at a time (so
several containers mount one volume at once), each writing one file and exiting. Bounded by
count and by time; at the end every volume's mount refcount is exactly zero, in Status and in
the state database, and every file is there with its content."""

from __future__ import annotations

import random
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from chaoskit import Budget
from e2e.helpers import E2E

pytestmark = [pytest.mark.chaos, pytest.mark.docker]

VOLUMES = 10
RUNS = 50
PARALLEL = 5
TIME_BOUND_S = 90.0


def test_soak_50_containers_on_10_volumes(e2e: E2E, rng: random.Random) -> None:
    budget = Budget(TIME_BOUND_S, "soak")
    prefix = e2e.unique("soak")
    volumes = [e2e.create_volume(f"{prefix}-v{i}") for i in range(VOLUMES)]
    plan = [(i, rng.choice(volumes)) for i in range(RUNS)]
    latencies: list[float] = []

    def one(run: tuple[int, str]) -> float:
        i, volume = run
        if budget.left() <= 0:
            raise AssertionError(f"soak: run {i} not started within {TIME_BOUND_S:.0f}s")
        started = time.monotonic()
        e2e.run(
            "--rm", "-v", f"{volume}:/data", e2e.image,
            "sh", "-c", f"echo run-{i} > /data/run-{i}.txt",
            timeout=min(60.0, max(5.0, budget.left())),
        )  # fmt: skip
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        latencies = list(pool.map(one, plan))
    wall = time.monotonic() - started
    ordered = sorted(latencies)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    print(f"soak: {RUNS} runs on {VOLUMES} volumes, {PARALLEL} at a time, in {wall:.1f}s; "
          f"docker run latency median {statistics.median(latencies):.2f}s, p95 {p95:.2f}s, "
          f"max {ordered[-1]:.2f}s")  # fmt: skip
    # Refcounts: exactly zero, as Docker sees them and as stowage recorded them.
    db = sqlite3.connect(f"file:{e2e.stowage.root / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT name, mount_id, count FROM mounts WHERE name LIKE ?", (f"{prefix}-%",)
        ).fetchall()
    finally:
        db.close()
    assert rows == [], f"mount records left after every container exited: {rows}"
    for volume in volumes:
        info = e2e.inspect_volume(volume)
        assert info["Status"]["mounts"] == 0, (volume, info["Status"])
        data = Path(info["Mountpoint"])
        want = {f"run-{i}.txt": f"run-{i}\n" for i, v in plan if v == volume}
        got = {p.name: p.read_text() for p in data.iterdir()}
        assert got == want, volume
