"""A FUSE process's counters for the daemon's metrics (`--stats-file`): written at start,
refreshed while it serves, counting failed and retried uploads and the bytes through the
mount, and gone when the process exits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fusemount import MountFactory
from harness.s3servers import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.fuse]


def wait_for(check: Callable[[dict[str, Any]], bool], path: Path, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20  # the file is rewritten every 5 s
    while True:
        stats: dict[str, Any] = json.loads(path.read_text())
        if check(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stats}")
        time.sleep(0.1)


def test_counts_a_failed_upload_and_its_retry(
    mount_factory: MountFactory, private_rclone_server: S3Server, tmp_path: Path
) -> None:
    server = private_rclone_server
    stats_file = tmp_path / "fuse.stats.json"
    extra = ["--stats-file", str(stats_file), "--retry-interval", "1", "--log-format", "json"]
    m = mount_factory(server, extra=extra)
    assert json.loads(stats_file.read_text())["upload_failures"] == 0
    f = (m.path / "kept.bin").open("wb")
    f.write(b"x" * 5000)
    server.stop()
    with pytest.raises(OSError):
        f.close()
    failed = wait_for(lambda s: s["upload_failures"] >= 1, stats_file, "the failure counted")
    assert failed["bytes_written"] == 5000
    assert failed["dirty_files"] == 1
    assert failed["uploads"] == 0
    server.start()
    done = wait_for(lambda s: s["uploads"] >= 1, stats_file, "the retried upload counted")
    assert done["bytes_uploaded"] == 5000
    assert done["dirty_files"] == 0
    assert (m.path / "kept.bin").read_bytes() == b"x" * 5000
    assert m.stop() == 0
    assert not stats_file.exists()  # a process that is gone counts nothing
    for line in m.log().splitlines():
        assert json.loads(line)["level"]  # --log-format json: every line is an object
