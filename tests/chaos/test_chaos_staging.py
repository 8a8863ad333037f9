"""Staged volumes under fire, through the real daemon's socket: kill -9 of the daemon at random
points of stage-in and of stage-out, and kill -9 of the S3 server mid stage-in (restarted on the
same port). After each fault nothing partial is visible (volume files, bucket objects); after
the restart the volume equals the source and the bucket equals the volume, checksum by checksum.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from chaoskit import (
    MARKER,
    Budget,
    Chaos,
    MiB,
    assert_no_partial,
    digest_bucket,
    digest_tree,
    make_tree,
    new_mount_id,
    temp_files,
    upload_tree,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.s3]

ROUNDS = 2
BWLIMIT = "8M"
RATE = 8 * MiB


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _job(world: Chaos, name: str, direction: str) -> dict[str, Any]:
    job: dict[str, Any] = world.status(name)[direction]
    return job


def _running_for(world: Chaos, name: str, direction: str, seconds: float) -> dict[str, Any]:
    """Wait until `direction` runs, then `seconds` more; returns the status then. A time, not a
    byte count: Status's bytes_done runs ahead of the bytes really moved (see docs/reliability.md),
    so the stage_bwlimit rate is the better clock."""
    wait_for(lambda: _job(world, name, direction)["state"] in ("running", "done"), 60,
             f"{direction} of {name} to start", interval=0.02)  # fmt: skip
    time.sleep(seconds)
    return _job(world, name, direction)


def _staged_tree(world: Chaos, name: str) -> dict[str, str]:
    digest = digest_tree(world.data_dir(name))
    assert [t for t in temp_files(world.data_dir(name)) if t != MARKER] == []
    return digest


def test_daemon_kill9_mid_stage_in_and_mid_stage_out(world: Chaos, rng: random.Random) -> None:
    budget = Budget(120, "daemon kill -9 during staging")
    server = world.start_server()
    world.start_daemon()
    for round_ in range(ROUNDS):
        budget.check()
        bucket = server.new_bucket()
        src = world.base / f"src{round_}"
        expected = make_tree(src, rng, big=4, small=30)
        upload_tree(server, bucket, "data", src)
        name = f"staged{round_}"
        url = f"s3://{bucket}/data"
        opts = world.s3_opts(stage_in=url, stage_out=url, prefetch="true", stage_bwlimit=BWLIMIT)
        assert world.client().create(name, opts) == {"Err": ""}
        # -- kill -9 during stage-in
        at = rng.uniform(0.1, 0.9) * _size(src) / RATE
        job = _running_for(world, name, "stage_in", at)
        world.crash_daemon()
        print(f"round {round_}: stage-in killed {at:.2f}s in, {job['files_done']} of "
              f"{len(expected)} files done, state {job['state']}")  # fmt: skip
        assert_no_partial(digest_tree(world.data_dir(name)), expected, "volume after kill")
        world.start_daemon()
        mount_id = new_mount_id()
        reply = world.client().mount(name, mount_id)
        assert reply["Err"] == "", reply
        assert _staged_tree(world, name) == expected
        assert _job(world, name, "stage_in")["state"] == "done"
        # -- the container's work, then kill -9 during stage-out
        new = world.data_dir(name) / "new"
        expected.update({f"new/{k}": v for k, v in make_tree(new, rng, 3, 10).items()})
        assert world.client().unmount(name, mount_id) == {"Err": ""}
        at = rng.uniform(0.1, 0.9) * _size(new) / RATE
        job = _running_for(world, name, "stage_out", at)
        world.crash_daemon()
        print(f"round {round_}: stage-out killed {at:.2f}s in, {job['files_done']} of "
              f"{job['files_total']} files done, state {job['state']}")  # fmt: skip
        assert_no_partial(digest_bucket(server, bucket, "data"), expected, "bucket after kill")
        world.start_daemon()  # recovery resumes the unfinished stage-out
        wait_for(lambda name=name: _job(world, name, "stage_out")["state"] == "done",
                 budget.left(), "stage-out resumed after the restart", interval=0.1)  # fmt: skip
        assert digest_bucket(server, bucket, "data") == _staged_tree(world, name) == expected
        assert world.status(name)["mounts"] == 0
        assert world.client().remove(name) == {"Err": ""}


def test_s3_server_kill9_mid_stage_in_resumes(world: Chaos, rng: random.Random) -> None:
    budget = Budget(100, "S3 server kill -9 during stage-in")
    server = world.start_server()
    world.start_daemon()
    for round_ in range(ROUNDS):
        budget.check()
        bucket = server.new_bucket()
        src = world.base / f"src{round_}"
        expected = make_tree(src, rng, big=4, small=30)
        upload_tree(server, bucket, "in", src)
        name = f"staged{round_}"
        opts = world.s3_opts(stage_in=f"s3://{bucket}/in", prefetch="true", stage_bwlimit=BWLIMIT)
        assert world.client().create(name, opts) == {"Err": ""}
        at = rng.uniform(0.1, 0.9) * _size(src) / RATE
        job = _running_for(world, name, "stage_in", at)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        down = rng.uniform(0.2, 3.0)
        print(f"round {round_}: S3 server killed {at:.2f}s in, {job['files_done']} of "
              f"{len(expected)} files done, state {job['state']}; down {down:.1f}s")  # fmt: skip
        time.sleep(down)
        assert_no_partial(digest_tree(world.data_dir(name)), expected, "volume, server down")
        server.start()  # same port, same data directory
        # The interrupted job may have failed meanwhile: the next Mount retries it, keeping
        # finished files. Bounded: three Mounts.
        mount_id = new_mount_id()
        for attempt in range(3):
            budget.check()
            reply = world.client().mount(name, mount_id)
            if reply["Err"] == "":
                break
            print(f"round {round_}: Mount attempt {attempt}: {reply['Err']}")
            wait_for(lambda name=name: _job(world, name, "stage_in")["state"] != "running", 60,
                     "stage-in to stop running")  # fmt: skip
        else:
            pytest.fail(f"stage-in never completed after the S3 server came back: {reply}")
        assert _staged_tree(world, name) == expected
        assert world.client().unmount(name, mount_id) == {"Err": ""}
        assert world.client().remove(name) == {"Err": ""}
