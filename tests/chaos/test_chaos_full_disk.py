"""A full disk: the daemon's --root is a 64 MiB ext4 on a loop device. A stage-in larger than the
free space fails clearly (Status says no space, nothing half-visible under a final name); on the
full filesystem a write into an S3 volume (its FUSE cache lives under --root) fails with an
error, not a hang, and `stowage volume restore` fails clearly; removing the volume gives the
space back and a new stage-in works."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaoskit import (
    Chaos,
    MiB,
    assert_no_partial,
    digest_tree,
    free_bytes,
    loop_ext4,
    make_tree,
    new_mount_id,
    stowage_cmd,
)

pytestmark = [pytest.mark.chaos, pytest.mark.s3, pytest.mark.fuse]

DISK_MIB = 64
NO_SPACE = re.compile(r"no space|ENOSPC|disk (is )?full|errno 28", re.IGNORECASE)
#: A bounded writer: ENOSPC or EIO is the expected outcome; a hang is killed by the timeout.
WRITER = """
import os, sys
with open(sys.argv[1], "wb") as fh:
    for _ in range(int(sys.argv[2])):
        fh.write(os.urandom(1 << 20))
"""


@pytest.fixture
def small_root(world: Chaos) -> Iterator[Chaos]:
    """`world` whose daemon root is the loop-mounted ext4; unmounted and detached after."""
    world.keep_mounted.add(world.root)
    with loop_ext4(world.base / "disk.img", world.root, DISK_MIB):
        try:
            yield world
        finally:
            problems = world.teardown()  # before the unmount: nothing may hold the filesystem
            assert not problems, problems


def _fill_by_stage_in(world: Chaos, rng: random.Random) -> tuple[str, dict[str, str]]:
    """A host-path stage-in of more than the free space; returns its name and source digest."""
    src = world.allowed / "big-source"
    free = free_bytes(world.root)
    expected = make_tree(src, rng, big=(free // (4 * MiB)) + 4, small=20, big_mib=(4, 5))
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    print(f"free {free / MiB:.1f} MiB, stage-in source {size / MiB:.1f} MiB")
    assert size > free
    client = world.client()
    assert client.create("fill", {"stage_in": str(src), "stage_timeout": "60"}) == {"Err": ""}
    started = time.monotonic()
    reply = client.mount("fill", new_mount_id())
    took = time.monotonic() - started
    print(f"Mount of the overfull stage-in answered in {took:.1f}s: {reply['Err']!r}")
    assert reply["Err"], "a stage-in larger than the disk must not mount"
    assert NO_SPACE.search(reply["Err"]), reply["Err"]
    job = world.status("fill")["stage_in"]
    assert job["state"] == "failed" and NO_SPACE.search(job["last_error"] or ""), job
    return "fill", expected


def _fill_the_rest(path: Path) -> None:
    """Whatever the failed stage-in left free, used up (bounded by the disk's size)."""
    with open(path, "wb") as fh:
        for _ in range(DISK_MIB):
            try:
                fh.write(b"\0" * MiB)
                fh.flush()
            except OSError:
                break


def test_overfull_stage_in_leaves_nothing_half_visible(
    small_root: Chaos, rng: random.Random
) -> None:
    world = small_root
    world.start_daemon()
    name, expected = _fill_by_stage_in(world, rng)
    found = digest_tree(world.data_dir(name))
    for rel, sha in found.items():
        if expected[rel] != sha:
            size = (world.data_dir(name) / rel).stat().st_size
            print(f"torn: {rel}: {size} of {(world.allowed / 'big-source' / rel).stat().st_size}")
    assert_no_partial(found, expected, "volume on the full disk")


def test_full_disk_fails_clearly(small_root: Chaos, rng: random.Random) -> None:
    world = small_root
    server = world.start_server()
    world.start_daemon()
    client = world.client()
    bucket = server.new_bucket()
    assert client.create("cached", {"backend": "s3", "bucket": bucket, **world.s3_opts()}) == {
        "Err": ""
    }
    assert client.create("target", None) == {"Err": ""}
    reply = client.mount("cached", new_mount_id())
    assert reply["Err"] == "", reply
    s3_mountpoint = reply["Mountpoint"]
    _fill_by_stage_in(world, rng)
    print(f"free after the failed stage-in: {free_bytes(world.root) / MiB:.1f} MiB")
    filler = world.root / "filler"
    _fill_the_rest(filler)
    print(f"free after the filler: {free_bytes(world.root) / MiB:.2f} MiB")
    # FUSE cache on the full disk: the write fails with an error, it does not hang.
    started = time.monotonic()
    write = subprocess.run(
        [sys.executable, "-c", WRITER, f"{s3_mountpoint}/big.bin", "16"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    last = write.stderr.strip().splitlines()[-1:]
    print(f"FUSE write on the full disk: exit {write.returncode} after "
          f"{time.monotonic() - started:.1f}s: {last}")  # fmt: skip
    assert write.returncode != 0, "16 MiB written through a cache on a full disk"
    assert re.search(r"Errno (28|5)\b", write.stderr), write.stderr
    # restore into a local volume on the full disk: a clear error, no hang.
    backup = world.base / "backup"
    make_tree(backup, rng, big=3, small=10)
    started = time.monotonic()
    restore = subprocess.run(
        stowage_cmd("volume", "restore", str(backup), "target", "--root", str(world.root)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    last = restore.stderr.strip().splitlines()[-1:]
    print(f"restore on the full disk: exit {restore.returncode} after "
          f"{time.monotonic() - started:.1f}s: {last}")  # fmt: skip
    assert restore.returncode != 0
    assert NO_SPACE.search(restore.stderr), restore.stderr
    filler.unlink()


def test_freeing_a_full_disk_returns_the_space(small_root: Chaos, rng: random.Random) -> None:
    world = small_root
    world.start_daemon()
    empty = free_bytes(world.root)
    name, _ = _fill_by_stage_in(world, rng)
    filler = world.root / "filler"
    _fill_the_rest(filler)
    full = free_bytes(world.root)
    reply = world.client().remove(name)
    print(f"Remove on the full disk (free {full / MiB:.2f} MiB): {reply}")
    assert reply == {"Err": ""}, "Remove on a full disk must succeed"
    filler.unlink()
    freed = free_bytes(world.root)
    print(f"free: empty {empty / MiB:.1f} MiB, full {full / MiB:.2f}, after rm {freed / MiB:.1f}")
    assert freed > empty - 4 * MiB, "volume rm did not give the space back"
    # A new stage-in that fits works.
    src = world.allowed / "small-source"
    expected = make_tree(src, rng, big=2, small=10)
    client = world.client()
    assert client.create("again", {"stage_in": str(src)}) == {"Err": ""}
    reply = client.mount("again", new_mount_id())
    assert reply["Err"] == "", reply
    assert digest_tree(world.data_dir("again")) == expected
