"""S3 volumes through the real dockerd: containers read and write a bucket prefix through
stowage's FUSE processes, which survive a restart of the daemon and are repaired when they die."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from harness.dockerd import wait_until
from harness.s3servers import S3Server

from e2e.helpers import E2E

pytestmark = [pytest.mark.docker, pytest.mark.s3, pytest.mark.fuse]


def s3_volume(e2e: E2E, server: S3Server, bucket: str, prefix: str, **opts: str) -> str:
    # rclone serve s3 cannot store `dir/` marker objects.
    return e2e.create_volume(
        e2e.unique("s3"),
        backend="s3",
        bucket=bucket,
        prefix=prefix,
        endpoint=server.endpoint,
        dir_markers="false",
        **opts,
    )


def fuse_pid(e2e: E2E, volume: str) -> int:
    return int((e2e.stowage.root / "s3" / volume / "fuse.pid").read_text().split()[0])


def keys(server: S3Server, bucket: str) -> set[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return {obj["Key"] for obj in listing.get("Contents", [])}


def test_container_writes_reach_s3_and_another_volume_reads_them(
    e2e: E2E, s3_server: S3Server
) -> None:
    bucket = s3_server.new_bucket()
    writer_vol = s3_volume(e2e, s3_server, bucket, "shared")
    reader_vol = s3_volume(e2e, s3_server, bucket, "shared")
    e2e.run(
        "--rm", "-v", f"{writer_vol}:/data", e2e.image,
        "sh", "-c", "mkdir -p /data/sub && echo from-container > /data/sub/hello.txt",
    )  # fmt: skip
    assert "shared/sub/hello.txt" in keys(s3_server, bucket)
    body = s3_server.client().get_object(Bucket=bucket, Key="shared/sub/hello.txt")["Body"]
    assert body.read() == b"from-container\n"
    out = e2e.run("--rm", "-v", f"{reader_vol}:/data", e2e.image, "cat", "/data/sub/hello.txt")
    assert out.stdout == "from-container\n"
    status = e2e.inspect_volume(writer_vol)["Status"]
    assert status["backend"] == "s3"
    assert status["fuse"] == "not mounted"
    assert status["options"]["bucket"] == bucket


def test_non_root_container_writes(e2e: E2E, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    vol = s3_volume(e2e, s3_server, bucket, "users", uid="1000", gid="1000")
    e2e.run(
        "--rm", "--user", "1000:1000", "-v", f"{vol}:/data", e2e.image,
        "sh", "-c", "echo mine > /data/owned.txt && stat -c '%u %g' /data/owned.txt",
    )  # fmt: skip
    head = s3_server.client().head_object(Bucket=bucket, Key="users/owned.txt")
    metadata = {key.lower(): value for key, value in head["Metadata"].items()}  # rclone: "Uid"
    assert (metadata.get("uid"), metadata.get("gid")) == ("1000", "1000")


def test_killed_fuse_process_shows_in_inspect_and_next_run_remounts(
    e2e: E2E, s3_server: S3Server
) -> None:
    bucket = s3_server.new_bucket()
    vol = s3_volume(e2e, s3_server, bucket, "p")
    holder = e2e.unique("holder")
    e2e.run("-d", "--init", "--name", holder, "-v", f"{vol}:/data", e2e.image, "sleep", "600")
    wait_until(lambda: (e2e.stowage.root / "s3" / vol / "fuse.pid").exists(), 20, what="mount")
    assert e2e.inspect_volume(vol)["Status"]["fuse"] == "mounted"
    os.kill(fuse_pid(e2e, vol), signal.SIGKILL)
    wait_until(
        lambda: e2e.inspect_volume(vol)["Status"]["fuse"].startswith("dead"), 20, what="dead"
    )
    # The old container keeps a dead handle (Docker never re-mounts a running container);
    # a new container's Mount repairs the volume.
    out = e2e.run(
        "--rm", "-v", f"{vol}:/data", e2e.image,
        "sh", "-c", "echo again > /data/after.txt && cat /data/after.txt",
    )  # fmt: skip
    assert out.stdout == "again\n"
    assert e2e.inspect_volume(vol)["Status"]["fuse"] == "mounted"  # the holder still uses it
    e2e.docker("rm", "-f", holder)
    assert "p/after.txt" in keys(s3_server, bucket)


def test_daemon_restart_does_not_break_a_running_container(e2e: E2E, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    vol = s3_volume(e2e, s3_server, bucket, "live")
    worker = e2e.unique("worker")
    e2e.run(
        "-d", "--init", "--name", worker, "-v", f"{vol}:/data", e2e.image,
        "sh", "-c", "echo before > /data/before.txt; sleep 600",
    )  # fmt: skip
    wait_until(lambda: "live/before.txt" in keys(s3_server, bucket), 30, what="first upload")
    pid = fuse_pid(e2e, vol)
    e2e.crash_stowage()  # kill -9 of the daemon: the FUSE process lives in its own session
    e2e.stowage.start()
    assert Path(f"/proc/{pid}").exists()
    e2e.docker("exec", worker, "sh", "-c", "echo during > /data/during.txt")
    assert e2e.docker("exec", worker, "cat", "/data/before.txt").stdout == "before\n"
    assert e2e.inspect_volume(vol)["Status"]["fuse"] == "mounted"
    assert fuse_pid(e2e, vol) == pid  # adopted, not restarted
    e2e.docker("stop", worker)  # Unmount through the new daemon flushes and stops FUSE
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, what="FUSE process exit")
    assert {"live/before.txt", "live/during.txt"} <= keys(s3_server, bucket)
