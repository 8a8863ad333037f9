"""Fixtures for the chaos tier: a seeded RNG per test (the seed is printed, and listed in
pytest's summary; STOWAGE_CHAOS_SEED=N replays a run) and a `world` (temp dir, daemon, private
rclone server) that is always torn down: no process, mount or directory outlives the test."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest
from chaoskit import SEEDS, Chaos, chaos_world


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    fixed = os.environ.get("STOWAGE_CHAOS_SEED")
    value = int(fixed) if fixed else int(time.time() * 1000) % 1_000_000_007
    SEEDS.append((request.node.nodeid, value))
    print(f"chaos seed {value} (replay: STOWAGE_CHAOS_SEED={value} pytest '{request.node.nodeid}')")
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def world(rng: random.Random, seed: int) -> Iterator[Chaos]:
    if os.geteuid() != 0:
        pytest.skip("the chaos tier needs root (the daemon binds and mounts)")
    with chaos_world(rng, seed) as made:
        yield made


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SEEDS:
        terminalreporter.section("chaos seeds")
        for nodeid, value in SEEDS:
            terminalreporter.write_line(f"STOWAGE_CHAOS_SEED={value} {nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the tail of the chaos daemon's log."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        made = getattr(item, "funcargs", {}).get("world")
        if isinstance(made, Chaos):
            report.sections.append(("stowage log (tail)", made.log_tail()))
