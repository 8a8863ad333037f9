"""FUSE processes forked by the launcher (plugin.fusefs.launcher) keep every guarantee of a
spawned one: the mount works, a restarted daemon adopts the process, a killed process is
repaired by the next Mount, and a dead launcher only means spawning as before."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.s3servers import S3Server
from s3kit import DriverFactory, s3_options

from plugin.backends import fuseproc

pytestmark = [pytest.mark.s3, pytest.mark.fuse]

ID1 = "1" * 64
ID2 = "2" * 64


def fuse_pid(root: Path, name: str) -> int:
    return int((root / "s3" / name / "fuse.pid").read_text().split()[0])


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture(autouse=True)
def fresh_launcher() -> Iterator[None]:
    """Each test starts without a launcher and leaves none behind."""
    fuseproc.launcher.stop()
    yield
    fuseproc.launcher.stop()


def test_mount_is_forked_by_the_launcher_and_reads_and_writes(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    rclone_server.client().put_object(Bucket=bucket, Key="there.txt", Body=b"from s3")
    driver = make_driver()
    driver.create("v", s3_options(rclone_server, bucket))
    mountpoint = Path(driver.mount("v", ID1))
    pid = fuse_pid(root, "v")
    assert fuseproc.launcher.pid is not None
    assert parent(pid) == fuseproc.launcher.pid  # forked, not spawned
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "stowage-fusefs"
    assert (mountpoint / "there.txt").read_text() == "from s3"
    (mountpoint / "written.txt").write_text("via the launcher")
    assert driver.get("v").status["fuse"] == "mounted"
    driver.unmount("v", ID1)
    body = rclone_server.client().get_object(Bucket=bucket, Key="written.txt")["Body"].read()
    assert body == b"via the launcher"
    wait_for(lambda: not Path(f"/proc/{pid}").exists())  # reaped by the launcher
    # The launcher recorded the exit status the daemon cannot wait for.
    assert (root / "s3" / "v" / "fuse.exit").read_text() == "last exit status 0\n"


def test_restart_adopts_a_forked_process(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    first = make_driver()
    first.create("v", s3_options(rclone_server, bucket))
    mountpoint = Path(first.mount("v", ID1))
    pid = fuse_pid(root, "v")
    launcher_pid = fuseproc.launcher.pid
    assert launcher_pid is not None and parent(pid) == launcher_pid
    # The daemon exits: its launcher goes with it, the FUSE process must not.
    first.close()
    fuseproc.launcher.stop()
    wait_for(lambda: not Path(f"/proc/{launcher_pid}").exists())
    assert Path(f"/proc/{pid}").exists()

    second = make_driver()
    second.recover()
    assert fuse_pid(root, "v") == pid  # the same process: a running container keeps working
    assert second.get("v").status["fuse"] == "mounted"
    (mountpoint / "during.txt").write_text("z")
    second.unmount("v", ID1)
    wait_for(lambda: not fuseproc.ProcessRef(pid, "x").alive() and not _running(pid))
    assert rclone_server.client().head_object(Bucket=bucket, Key="during.txt")["ContentLength"] == 1


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_forked_process_is_repaired_by_the_next_mount(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    driver.create("v", s3_options(rclone_server, bucket))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "before.txt").write_text("x")
    os.sync()
    pid = fuse_pid(root, "v")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: driver.get("v").status["fuse"].startswith("dead"))
    wait_for(lambda: "last exit status -9" in driver.get("v").status["fuse"])
    assert Path(driver.mount("v", ID2)) == mountpoint
    new_pid = fuse_pid(root, "v")
    assert new_pid != pid and parent(new_pid) == fuseproc.launcher.pid
    assert driver.get("v").status["fuse"] == "mounted"
    assert (mountpoint / "before.txt").read_text() == "x"
    (mountpoint / "after.txt").write_text("y")
    driver.unmount("v", ID1)
    driver.unmount("v", ID2)
    keys = {o["Key"] for o in rclone_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"before.txt", "after.txt"} <= keys


def test_a_dead_launcher_means_spawning(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    driver.create("a", s3_options(rclone_server, bucket, prefix="a"))
    driver.create("b", s3_options(rclone_server, bucket, prefix="b"))
    driver.create("c", s3_options(rclone_server, bucket, prefix="c"))
    driver.mount("a", ID1)
    forked = fuse_pid(root, "a")
    launcher_pid = fuseproc.launcher.pid
    assert launcher_pid is not None and parent(forked) == launcher_pid
    os.kill(launcher_pid, signal.SIGKILL)
    wait_for(lambda: fuseproc.launcher.pid is None)
    # The next Mount finds the launcher gone and spawns, as before there was one.
    mountpoint = Path(driver.mount("b", ID1))
    spawned = fuse_pid(root, "b")
    assert parent(spawned) == os.getpid()
    (mountpoint / "f.txt").write_text("spawned")
    # The process the dead launcher forked lives on and still serves its mount.
    assert driver.get("a").status["fuse"] == "mounted"
    # Meanwhile a new launcher started, and the Mount after that uses it again.
    driver.mount("c", ID1)
    new_launcher = fuseproc.launcher.pid
    assert new_launcher not in (None, launcher_pid)
    assert parent(fuse_pid(root, "c")) == new_launcher
    for name in ("a", "b", "c"):
        driver.unmount(name, ID1)
    body = rclone_server.client().get_object(Bucket=bucket, Key="b/f.txt")["Body"].read()
    assert body == b"spawned"


def test_create_waits_for_the_launchers_imports_so_the_mount_forks_at_once(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    assert not fuseproc.launcher.ready
    driver.create("v", s3_options(rclone_server, bucket))
    # The first Mount after a daemon start no longer pays the launcher's imports.
    assert fuseproc.launcher.ready
    launcher_pid = fuseproc.launcher.pid
    driver.mount("v", ID1)
    assert fuseproc.launcher.pid == launcher_pid
    assert parent(fuse_pid(root, "v")) == launcher_pid
    driver.unmount("v", ID1)
