"""Fixtures for the S3 FUSE tier: real S3 servers on loopback and real mounts of
`python -m plugin.fusefs`. Every mount and server is torn down even when a test fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fusemount import Mount, MountFactory, fuse_unusable, start_mount
from harness import s3servers
from harness.s3servers import S3Server

# Server fixtures live in the shared harness; re-export them to this directory's tests.
s3_server = s3servers.s3_server
rclone_server = s3servers.rclone_server
private_rclone_server = s3servers.private_rclone_server


@pytest.fixture(scope="session")
def fuse_available() -> None:
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def mount_factory(fuse_available: None, tmp_path: Path) -> Iterator[MountFactory]:
    """Start mounts; all of them are unmounted and their processes ended after the test.

    A handler that hit an unexpected exception (logged as "unexpected error") fails the test
    even if the syscall got EIO: that is a bug, not an expected failure.
    """
    mounts: list[Mount] = []

    def _factory(server: S3Server, bucket: str | None = None, **kwargs: Any) -> Mount:
        n = len(mounts)
        m = start_mount(
            server,
            bucket or server.new_bucket(),
            tmp_path / f"mnt{n}",
            tmp_path / f"work{n}",
            **kwargs,
        )
        mounts.append(m)
        return m

    yield _factory
    problems = []
    for m in mounts:
        m.cleanup()
        log = m.log()
        if "unexpected error" in log or "filesystem loop failed" in log:
            problems.append(f"{m.path}: handler crashed, see log:\n{log[-5000:]}")
    with contextlib.suppress(FileNotFoundError):
        mounted = [
            line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line
        ]
        assert not mounted, f"mounts left behind: {mounted}"
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def mnt(mount_factory: MountFactory, s3_server: S3Server) -> Mount:
    """A fresh bucket on each server kind, mounted."""
    return mount_factory(s3_server)
