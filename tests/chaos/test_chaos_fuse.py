"""kill -9 of an S3 volume's FUSE process while a writer is in the middle of its files, through
the real daemon. Close-to-open: every file whose close(2) returned is in S3 whole; no partial
object is ever visible; the next Mount repairs the dead mount and the files read back equal."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from chaoskit import Budget, Chaos, content, digest_bucket, new_mount_id, wait_for

from plugin.names import encode_name

pytestmark = [pytest.mark.chaos, pytest.mark.s3, pytest.mark.fuse]

ROUNDS = 2
FILES = 40

WRITER = """
import os, random, sys
mountpoint, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    name = f"f{i:03d}.bin"
    size = random.Random(f"size:{seed}:{i}").randrange(64 << 10, 3 << 20)
    data = random.Random(f"{seed}:{name}").randbytes(size)
    with open(os.path.join(mountpoint, name), "wb") as fh:
        for off in range(0, size, 64 << 10):
            fh.write(data[off : off + (64 << 10)])
    print(i, flush=True)
"""


def _expected(seed: int, i: int) -> tuple[str, str]:
    name = f"f{i:03d}.bin"
    size = random.Random(f"size:{seed}:{i}").randrange(64 << 10, 3 << 20)
    return name, hashlib.sha256(content(seed, name, size)).hexdigest()


def _fuse_pid(world: Chaos, name: str) -> int:
    return int((world.root / "s3" / encode_name(name) / "fuse.pid").read_text().split()[0])


def test_fuse_kill9_mid_write_then_mount_repairs(world: Chaos, rng: random.Random) -> None:
    budget = Budget(90, "FUSE kill -9 during writes")
    server = world.start_server()
    world.start_daemon()
    for round_ in range(ROUNDS):
        budget.check()
        bucket = server.new_bucket()
        name = f"s3vol{round_}"
        opts = {"backend": "s3", "bucket": bucket, **world.s3_opts()}
        assert world.client().create(name, opts) == {"Err": ""}
        first = new_mount_id()
        reply = world.client().mount(name, first)
        assert reply["Err"] == "", reply
        mountpoint = reply["Mountpoint"]
        seed = rng.randrange(1 << 30)
        expected = dict(_expected(seed, i) for i in range(FILES))
        kill_after = rng.randrange(1, FILES - 2)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, mountpoint, str(seed), str(FILES)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        closed: list[int] = []
        try:
            assert writer.stdout is not None
            while len(closed) < kill_after:
                line = writer.stdout.readline()
                assert line, f"writer ended early: {writer.wait(10)} {writer.stderr.read()}"  # type: ignore[union-attr]
                closed.append(int(line))
            time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next file
            os.kill(_fuse_pid(world, name), signal.SIGKILL)
            out, err = writer.communicate(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.communicate(timeout=10)
        closed += [int(line) for line in out.split()]
        print(f"round {round_}: FUSE killed after {len(closed)} closed files "
              f"(writer exit {writer.returncode}: {err.strip().splitlines()[-1:]})")  # fmt: skip
        objects = digest_bucket(server, bucket, "")
        torn = {k: v for k, v in objects.items() if expected.get(k) != v}
        assert not torn, f"partial objects visible: {sorted(torn)}"
        for i in closed:
            key, sha = _expected(seed, i)
            assert objects.get(key) == sha, f"{key} was closed before the kill but is not in S3"
        # The next container's Mount finds the dead FUSE mount and repairs it.
        second = new_mount_id()
        reply = world.client().mount(name, second)
        assert reply["Err"] == "", reply
        assert world.status(name)["fuse"] == "mounted"
        for i in closed:
            key, sha = _expected(seed, i)
            with open(os.path.join(mountpoint, key), "rb") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == sha, key
        with open(os.path.join(mountpoint, "after.txt"), "wb") as fh:
            fh.write(b"written after the repair\n")
        assert world.client().unmount(name, first) == {"Err": ""}
        assert world.client().unmount(name, second) == {"Err": ""}
        wait_for(lambda name=name: world.status(name)["fuse"] == "not mounted", 30, "unmount")
        objects = digest_bucket(server, bucket, "")
        assert objects["after.txt"] == hashlib.sha256(b"written after the repair\n").hexdigest()
        torn = {k: v for k, v in objects.items() if k != "after.txt" and expected.get(k) != v}
        assert not torn, f"partial objects visible after the repair: {sorted(torn)}"
        assert world.client().remove(name) == {"Err": ""}
