"""kill -9 of the command-line copies at random points, then a rerun: `stowage cp` mid-upload and
mid-download at random byte offsets, and `stowage volume restore` mid-tree and mid-archive.
After every kill nothing partial is visible under a final name (file or object); after the rerun
the checksum of every file equals the source's."""

from __future__ import annotations

import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from chaoskit import (
    Budget,
    Chaos,
    MiB,
    ProgressWatcher,
    assert_no_partial,
    digest_bucket,
    digest_tree,
    kill9,
    make_tree,
    stowage_cmd,
    temp_files,
)

from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

pytestmark = [pytest.mark.chaos, pytest.mark.s3]

KILLS_PER_DIRECTION = 2
#: Slow enough for a kill at a chosen percentage (the progress bar updates every 0.2 s).
SLOW = ["--progress", "--bwlimit", "16M"]


def _cp(world: Chaos, src: str, dst: str, *extra: str) -> list[str]:
    assert world.server is not None
    return stowage_cmd(
        "cp", "--endpoint", world.server.endpoint, "--no-dir-markers", *extra, src, dst
    )


def _kill_at_percent(world: Chaos, cmd: list[str], target: float, budget: Budget) -> float:
    """Run `cmd` with a progress bar; kill -9 once it reports `target` percent. Returns the
    percentage reached (100.0: it finished before the kill point)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=world.aws_env()
    )
    watcher = ProgressWatcher(proc)
    try:
        deadline = time.monotonic() + min(60.0, budget.left())
        while watcher.pct < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"no progress to {target}%: {watcher.text!r}"
            time.sleep(0.01)
    finally:
        kill9(proc)
        watcher.join()
    return watcher.pct if proc.returncode == -9 else 100.0


def _rerun(world: Chaos, cmd: list[str], budget: Budget) -> None:
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=world.aws_env(), timeout=max(5.0, budget.left())
    )
    assert done.returncode == 0, done.stderr


def test_cp_kill9_mid_upload_and_download_then_rerun(world: Chaos, rng: random.Random) -> None:
    budget = Budget(100, "stowage cp chaos")
    server = world.start_server()
    bucket = server.new_bucket()
    src = world.base / "src"
    expected = make_tree(src, rng, big=3, small=40, big_mib=(7, 12))
    total = sum((src / rel).stat().st_size for rel in expected)
    print(f"tree: {len(expected)} files, {total / MiB:.1f} MiB")
    # -- upload: local tree -> s3://bucket/up (multipart: 5 MiB parts)
    up = ["--chunk-size", "5M", "-j", "2"]
    upload = _cp(world, str(src) + "/", f"s3://{bucket}/up/", *up)
    for round_ in range(KILLS_PER_DIRECTION):
        budget.check()
        target = rng.uniform(5, 90)
        reached = _kill_at_percent(world, upload + SLOW, target, budget)
        print(f"upload round {round_}: kill -9 at {reached:.1f}% (target {target:.1f}%)")
        assert_no_partial(digest_bucket(server, bucket, "up"), expected, "bucket after kill")
    _rerun(world, upload, budget)
    assert digest_bucket(server, bucket, "up") == expected
    # -- download: s3://bucket/up -> local tree (chunked: 1 MiB chunks, journaled)
    dst = world.base / "dst"
    download = _cp(world, f"s3://{bucket}/up/", str(dst) + "/", "--chunk-size", "1M", "-j", "4")
    for round_ in range(KILLS_PER_DIRECTION):
        budget.check()
        target = rng.uniform(5, 90)
        reached = _kill_at_percent(world, download + SLOW, target, budget)
        print(f"download round {round_}: kill -9 at {reached:.1f}% (target {target:.1f}%)")
        if dst.exists():
            assert_no_partial(digest_tree(dst), expected, "destination after kill")
    _rerun(world, download, budget)
    assert digest_tree(dst) == expected
    assert temp_files(dst) == []


def test_cp_rerun_with_larger_chunks_leaves_no_journal(world: Chaos, rng: random.Random) -> None:
    """kill -9 mid-download with 1 MiB chunks, rerun with the default 8 MiB chunks: the files
    are right, but `.stowage.<name>.journal` of every interrupted file stays in the tree."""
    budget = Budget(60, "orphan journal")
    server = world.start_server()
    bucket = server.new_bucket()
    src = world.base / "src"
    expected = make_tree(src, rng, big=4, small=4, big_mib=(3, 6))
    _rerun(world, _cp(world, str(src) + "/", f"s3://{bucket}/up/"), budget)
    dst = world.base / "dst"
    download = _cp(world, f"s3://{bucket}/up/", str(dst) + "/", "--chunk-size", "1M", "-j", "4")
    for _ in range(5):  # bounded: until a kill leaves an interrupted chunked file behind
        budget.check()
        shutil.rmtree(dst, ignore_errors=True)
        _kill_at_percent(world, download + SLOW, rng.uniform(20, 60), budget)
        if dst.exists() and any(t.endswith(".journal") for t in temp_files(dst)):
            break
    else:
        pytest.fail("no kill landed in the middle of a chunked file")
    _rerun(world, _cp(world, f"s3://{bucket}/up/", str(dst) + "/"), budget)
    assert digest_tree(dst) == expected
    assert temp_files(dst) == []


def _make_volumes(root: Path, *names: str) -> None:
    settings = Settings(root=root)
    root.mkdir(parents=True, exist_ok=True)
    driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    try:
        for name in names:
            driver.create(name, None)
    finally:
        driver.close()


def _count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@pytest.mark.parametrize("form", ["tree", "archive"])
def test_restore_kill9_then_rerun(world: Chaos, rng: random.Random, form: str) -> None:
    """`stowage volume restore` killed when a random number of files has landed."""
    budget = Budget(60, f"restore chaos ({form})")
    src = world.base / "backup"
    expected = make_tree(src, rng, big=4, small=300)
    source = str(src)
    if form == "archive":
        source = str(world.base / "backup.tar.gz")
        with tarfile.open(source, "w:gz", compresslevel=1) as tar:
            tar.add(src, arcname=".")
    names = [f"v{i}" for i in range(3)]
    _make_volumes(world.root, *names)
    data = {n: world.root / "volumes" / n / "data" for n in names}
    cmd = stowage_cmd("volume", "restore", source, "NAME", "--root", str(world.root), "-j", "2")
    for i, name in enumerate(names[:2]):
        budget.check()
        target = rng.randrange(1, len(expected))
        argv = [name if a == "NAME" else a for a in cmd]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while _count_files(data[name]) < target and proc.poll() is None:
                assert budget.left() > 0, "restore made no progress"
                time.sleep(0.005)
        finally:
            kill9(proc)
        landed = _count_files(data[name])
        print(f"{form} round {i}: kill -9 after {landed} files (target {target})")
        assert_no_partial(digest_tree(data[name]), expected, f"volume {name} after kill")
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=budget.left())
        assert rerun.returncode == 0, rerun.stderr
        assert digest_tree(data[name]) == expected
        assert temp_files(data[name]) == []
    # A second kill of the same volume, this time in the middle of an overwrite.
    budget.check()
    argv = [names[0] if a == "NAME" else a for a in cmd]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.2, 1.0))
    kill9(proc)
    assert_no_partial(digest_tree(data[names[0]]), expected, "volume after a second kill")
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=budget.left())
    assert rerun.returncode == 0, rerun.stderr
    assert digest_tree(data[names[0]]) == expected
