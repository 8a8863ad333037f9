"""The S3 backend through the driver core, with real FUSE processes against a real S3 server
on loopback. A restart is a second driver on the same root."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import s3servers
from s3kit import DriverFactory

from plugin.backends import mounts
from plugin.backends.fuseproc import FuseProcess
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

rclone_server = s3servers.rclone_server
private_rclone_server = s3servers.private_rclone_server


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's side of the credentials: its environment, as the AWS chain reads it."""
    for key, value in s3servers.aws_env({}).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def make_driver(root: Path, aws_credentials: None) -> Iterator[DriverFactory]:
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    made: list[VolumeDriver] = []

    def make(**overrides: Any) -> VolumeDriver:
        settings = Settings(root=root, **overrides)
        root.mkdir(parents=True, exist_ok=True)
        driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
        made.append(driver)
        return driver

    yield make
    # Stop every FUSE process a test left running and detach its mount.
    for state_dir in (root / "s3").glob("*") if (root / "s3").exists() else []:
        FuseProcess(state_dir, root / "mounts" / state_dir.name).stop(timeout=20)
    for mountpoint in (root / "mounts").glob("*") if (root / "mounts").exists() else []:
        with contextlib.suppress(OSError):
            if mounts.is_mountpoint(mountpoint):
                mounts.lazy_unmount(mountpoint)
    for driver in made:
        driver.close()
