"""A daemon that starts with S3 volumes starts its FUSE launcher (the fork server) at once, in
the background: the first Mount after a restart forks from a launcher that already did its
imports, instead of starting one and waiting for it (what made Mount p99 ~180 ms)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import s3servers
from harness.daemon import StowageDaemon
from harness.dockerd import unmount_under
from harness.s3servers import S3Server, aws_env

pytestmark = [pytest.mark.s3, pytest.mark.fuse]

rclone_server = s3servers.rclone_server

ID = "d" * 64
STARTED = "FUSE launcher started"


def wait_for(predicate: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def launchers_of(daemon: StowageDaemon) -> list[int]:
    """Live launcher processes whose parent is in the daemon's process group."""
    assert daemon.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"plugin.fusefs.launcher" not in (entry / "cmdline").read_bytes():
                continue
            state, ppid = _stat_fields(int(entry.name))[:2]
            if state != "Z" and os.getpgid(int(ppid)) == daemon.proc.pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.fixture
def s3_daemon(workdir: Path) -> Iterator[StowageDaemon]:
    if os.geteuid() != 0:
        pytest.skip("the daemon tests need root (FUSE mounts)")
    daemon = StowageDaemon(
        socket_path=workdir / "stowage.sock",
        root=workdir / "root",
        log_path=workdir / "stowage.log",
        env=aws_env(),
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill()
        for pid_file in (workdir / "root" / "s3").glob("*/fuse.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        unmount_under(workdir)


def test_a_restarted_daemon_with_s3_volumes_starts_its_launcher_before_any_mount(
    s3_daemon: StowageDaemon, rclone_server: S3Server, workdir: Path
) -> None:
    bucket = rclone_server.new_bucket()
    opts = {
        "backend": "s3",
        "bucket": bucket,
        "endpoint": rclone_server.endpoint,
        "dir_markers": "false",
    }
    assert s3_daemon.client().create("vol", opts).get("Err") in (None, "")
    s3_daemon.stop()
    logged_before = s3_daemon.log_text().count(STARTED)

    s3_daemon.start()
    # Nobody has mounted anything: the launcher starts because an S3 volume is known.
    wait_for(lambda: launchers_of(s3_daemon))
    (launcher,) = launchers_of(s3_daemon)
    answer = s3_daemon.client().mount("vol", ID)
    assert answer.get("Err") in (None, ""), answer
    fuse_pid = int((workdir / "root" / "s3" / "vol" / "fuse.pid").read_text().split()[0])
    # The Mount forked from that launcher and started none of its own.
    assert int(_stat_fields(fuse_pid)[1]) == launcher
    assert launchers_of(s3_daemon) == [launcher]
    assert s3_daemon.log_text().count(STARTED) == logged_before + 1
    (Path(answer["Mountpoint"]) / "hello.txt").write_text("after a restart")
    assert s3_daemon.client().unmount("vol", ID).get("Err") in (None, "")
    body = rclone_server.client().get_object(Bucket=bucket, Key="hello.txt")["Body"].read()
    assert body == b"after a restart"
