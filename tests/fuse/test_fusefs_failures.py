"""Failures over FUSE that must leave nothing misleading behind: a create that failed shows
no entry, data kept from a previous run is sent at once (not only after `retry_interval`,
which a short-lived container never reaches) and at exit, and a name with a newline stays
on one log line."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fusemount import Mount, MountFactory
from harness.s3servers import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.fuse]


def keys(m: Mount) -> list[str]:
    listing = m.client.list_objects_v2(Bucket=m.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_failed_create_leaves_no_phantom_entry(
    mount_factory: MountFactory, rclone_server: S3Server
) -> None:
    m = mount_factory(rclone_server)
    (m.path / "sub").mkdir()
    lock = (m.cache_dir / ".lock").read_bytes()
    # The cache directory disappears under the filesystem: creating a data file fails.
    for p in m.cache_dir.iterdir():
        p.unlink()
    m.cache_dir.rmdir()
    for name in ("top.txt", "sub/inner.txt"):
        with pytest.raises(OSError) as exc:
            (m.path / name).write_text("never")
        assert exc.value.errno == errno.ENOENT  # the cache's own errno, passed on
    assert os.listdir(m.path) == ["sub"]
    assert os.listdir(m.path / "sub") == []
    assert not (m.path / "top.txt").exists()
    m.cache_dir.mkdir()
    (m.cache_dir / ".lock").write_bytes(lock)
    (m.path / "top.txt").write_text("now")  # the name was never taken
    assert m.stop() == 0
    assert keys(m) == ["top.txt"]


def test_upload_kept_by_a_previous_run_is_sent_at_once(
    mount_factory: MountFactory, private_rclone_server: S3Server, tmp_path: Path
) -> None:
    server = private_rclone_server
    cache = tmp_path / "persistent-cache"
    bucket = server.new_bucket()
    slow = ["--retry-interval", "600"]
    m = mount_factory(server, bucket=bucket, cache_dir=cache, extra=slow)
    f = (m.path / "kept.txt").open("wb")
    f.write(b"kept for later")
    server.stop()
    with pytest.raises(OSError):
        f.close()
    assert m.stop() == 1
    assert list(cache.glob("*.json"))
    server.start()
    m2 = mount_factory(server, bucket=bucket, cache_dir=cache, extra=slow)
    wait_for(lambda: "kept.txt" in keys(m2), "the journaled upload, long before 600 s")
    assert (m2.path / "kept.txt").read_bytes() == b"kept for later"
    assert m2.stop() == 0
    assert not list(cache.glob("*.json"))


def test_upload_kept_by_a_previous_run_is_sent_at_a_quick_exit(
    mount_factory: MountFactory, private_rclone_server: S3Server, tmp_path: Path
) -> None:
    """A container that stops at once: the exit's flush sends kept uploads too."""
    server = private_rclone_server
    cache = tmp_path / "persistent-cache"
    bucket = server.new_bucket()
    slow = ["--retry-interval", "600"]
    m = mount_factory(server, bucket=bucket, cache_dir=cache, extra=slow)
    f = (m.path / "kept.txt").open("wb")
    f.write(b"kept")
    server.stop()
    with pytest.raises(OSError):
        f.close()
    assert m.stop() == 1
    server.start()
    m2 = mount_factory(server, bucket=bucket, cache_dir=cache, extra=slow)
    assert m2.stop() == 0
    assert keys(m2) == ["kept.txt"]
    assert not list(cache.glob("*.json"))


def test_a_name_with_a_newline_stays_on_one_log_line(
    mount_factory: MountFactory, s3_server: S3Server
) -> None:
    """rclone stores the name; moto's server answers its PUT with 404 (its router matches no
    key with a newline): an upload failure (EIO, data kept), never ENOENT for a file just
    written."""
    m = mount_factory(s3_server)
    name = "first\nsecond.txt"
    if s3_server.kind == "rclone":
        (m.path / name).write_text("x")
        assert m.stop() == 0
        assert keys(m) == [name]
    else:
        with pytest.raises(OSError) as exc:
            (m.path / name).write_text("x")
        assert exc.value.errno == errno.EIO
        assert m.stop() == 1
        assert "cannot store this name" in m.log()
        assert [p.read_bytes() for p in m.cache_dir.glob("*.data")] == [b"x"]
    log = m.log()
    assert "first\\nsecond.txt" in log
    assert not [line for line in log.splitlines() if line.startswith("second.txt")]
