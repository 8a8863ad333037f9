"""Issue 12: a Mount waiting for stage-in holds no lock another call needs, and Status after a
failed stage-in says what was really done."""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path

import pytest

from plugin.backends.staged.state import JobState
from plugin.driver import VolumeDriver
from plugin.errors import MountError, VolumeNotFoundError
from plugin.settings import Settings
from plugin.staging.progress import CopyResult, FileError

ID1 = "1" * 64
ID2 = "2" * 64
QUICK_S = 5.0  # generous: these calls take milliseconds; the old code took the whole timeout


def crawling_source(settings: Settings) -> Path:
    """4 MiB at stage_bwlimit=1K: stage-in outlasts every test."""
    src = settings.allowed_paths[0] / "crawl"
    src.mkdir()
    with open(src / "big.bin", "wb") as fh:
        fh.truncate(4 * 1024 * 1024)
    return src


def old_stripe(name: str) -> int:
    return zlib.crc32(name.encode()) % 64


def start_waiting_mount(driver: VolumeDriver, name: str) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def mount() -> None:
        try:
            outcome.append(driver.mount(name, ID1))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=mount, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while driver.get(name).status["stage_in"]["state"] != "running":
        assert time.monotonic() < deadline, "stage-in did not start"
        time.sleep(0.02)
    time.sleep(0.2)  # the Mount is now waiting
    assert outcome == []
    return thread, outcome


def timed(call: object) -> float:
    started = time.monotonic()
    call()  # type: ignore[operator]
    return time.monotonic() - started


def test_calls_on_a_volume_and_its_old_stripe_do_not_wait_for_its_stage_in(
    driver: VolumeDriver, settings: Settings
) -> None:
    src = crawling_source(settings)
    driver.create("v", {"stage_in": str(src), "stage_bwlimit": "1K", "stage_timeout": "30"})
    # Before issue 12 this name shared v's lock stripe.
    other = next(f"o{i}" for i in range(10_000) if old_stripe(f"o{i}") == old_stripe("v"))
    driver.create(other, None)
    thread, outcome = start_waiting_mount(driver, "v")
    try:
        assert timed(lambda: driver.mount(other, ID1)) < QUICK_S
        assert timed(lambda: driver.unmount(other, ID1)) < QUICK_S
        assert timed(lambda: driver.unmount("v", ID2)) < QUICK_S  # unknown ID: a no-op
        assert timed(lambda: driver.get("v")) < QUICK_S
        assert outcome == []  # still waiting
        # Remove of the volume proceeds, and the waiting Mount fails at once, saying why.
        assert timed(lambda: driver.remove("v")) < QUICK_S
        thread.join(QUICK_S)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], MountError)
        assert "removed" in str(outcome[0]) or isinstance(outcome[0], VolumeNotFoundError)
    finally:
        if "v" in {name for name, _ in driver.list()}:
            driver.remove("v")
        thread.join(QUICK_S)


def test_mount_still_fails_with_progress_after_its_timeout(
    driver: VolumeDriver, settings: Settings
) -> None:
    src = crawling_source(settings)
    driver.create("v", {"stage_in": str(src), "stage_bwlimit": "1K", "stage_timeout": "1"})
    started = time.monotonic()
    with pytest.raises(MountError, match=r"still staging in .* of 4\.0 MiB, 0 of 1 files"):
        driver.mount("v", ID1)
    assert 0.9 < time.monotonic() - started < QUICK_S
    assert driver.get("v").status["mounts"] == 0
    driver.remove("v")


def test_status_after_a_failed_copy_counts_only_what_was_done() -> None:
    result = CopyResult(
        state="failed",
        files_total=10,
        files_copied=3,
        files_skipped=1,
        files_failed=1,
        bytes_total=10_000,
        bytes_copied=3_000,
        bytes_skipped=500,
        bytes_resumed=200,
        errors=[FileError("f5", "Input/output error")],
    )
    job = JobState(state="running", bytes_done=4_100, bytes_total=10_000, files_total=10)
    job.finish(result)
    assert (job.bytes_done, job.bytes_total) == (3_700, 10_000)
    assert (job.files_done, job.files_total) == (4, 10)
    assert job.eta is None
    assert "3.6 KiB of 9.8 KiB, 4 of 10 files" in job.progress_text()


def test_status_after_a_successful_copy_is_all_done() -> None:
    result = CopyResult(
        state="done", files_total=2, files_copied=2, bytes_total=10, bytes_copied=10
    )
    job = JobState(state="running")
    job.finish(result)
    assert (job.bytes_done, job.files_done, job.eta) == (10, 2, 0.0)


def test_status_after_a_failed_stage_in_through_the_driver(
    driver: VolumeDriver, settings: Settings
) -> None:
    """A stage-in that fails on one file: Status counts the files really staged."""
    src = settings.allowed_paths[0] / "src"
    src.mkdir()
    for i in range(3):
        (src / f"ok{i}.txt").write_text("fine\n")
    driver.create("v", {"stage_in": str(src)})
    # A file the copy cannot create in the volume: a directory of that name is in the way.
    data = Path(driver.path("v"))
    (data / "ok1.txt").mkdir()
    (data / "ok1.txt" / "keep").write_text("x")
    with pytest.raises(MountError, match="failed"):
        driver.mount("v", ID1)
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "failed"
    assert status["files_total"] == 3
    assert status["files_done"] == 2
    assert status["bytes_total"] == 15 and status["bytes_done"] <= 15
