"""FuseProcess lifecycle with stand-in programs (the real FUSE filesystem is tested in
tests/fuse and end to end): readiness, failure reporting, pid-reuse safety, stop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from plugin.backends.fuseproc import FuseProcess, FuseStartError, ProcessRef

# Stand-ins for `python -m plugin.fusefs`: they get `--ready-fd N MOUNTPOINT` appended.
READY_THEN_WAIT = """
import os, signal, sys, time
fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("mounted", flush=True)
os.write(fd, b"ready\\n"); os.close(fd)
time.sleep(60)
"""
FAIL_AT_START = """
import sys
print("cannot access s3://bucket at http://127.0.0.1:1: connection refused", flush=True)
sys.exit(2)
"""
NEVER_READY = "import time; time.sleep(60)"


def argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture
def proc(tmp_path: Path) -> FuseProcess:
    return FuseProcess(tmp_path / "state", tmp_path / "mnt")


def test_start_waits_for_ready_and_records_pid(proc: FuseProcess) -> None:
    proc.start(argv(READY_THEN_WAIT), dict(os.environ), timeout=20)
    ref = proc.running()
    assert ref is not None and ref.alive()
    assert "mounted" in proc.log_file.read_text()
    assert proc.stop(timeout=10) == 0
    assert proc.running() is None
    assert not proc.pid_file.exists()


def test_exit_before_ready_reports_its_output(proc: FuseProcess) -> None:
    with pytest.raises(FuseStartError) as err:
        proc.start(argv(FAIL_AT_START), dict(os.environ), timeout=20)
    message = str(err.value)
    assert "exited with status 2 before mounting" in message
    assert "connection refused" in message
    assert proc.recorded() is None


def test_timeout_kills_the_process(proc: FuseProcess) -> None:
    with pytest.raises(FuseStartError, match=r"did not mount .* within 1s"):
        proc.start(argv(NEVER_READY), dict(os.environ), timeout=1)
    assert proc.recorded() is None


def test_a_recycled_pid_is_not_mistaken_for_the_process(proc: FuseProcess) -> None:
    proc.state_dir.mkdir(parents=True)
    proc.pid_file.write_text(f"{os.getpid()} 1\n")  # our pid, but another start time
    assert proc.recorded() == ProcessRef(os.getpid(), "1")
    assert proc.running() is None
    assert proc.state().startswith("dead")
    proc.clean()
    assert proc.recorded() is None
    assert proc.state() == "not mounted"


def test_a_process_that_dies_is_noticed_with_its_status(proc: FuseProcess) -> None:
    dies = READY_THEN_WAIT.replace("time.sleep(60)", "sys.exit(3)")
    proc.start(argv(dies), dict(os.environ), timeout=20)
    for _ in range(200):
        if proc.running() is None:
            break
        time.sleep(0.05)
    assert proc.running() is None
    state = proc.state()
    assert state.startswith("dead: the FUSE process is gone (last exit status 3)")
    assert str(proc.log_file) in state
