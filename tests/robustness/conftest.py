"""Robustness tier: full filesystems, half-finished operations and leftovers of crashes.

`small_fs` is a 16 MiB ext4 filesystem on a loop device (root): small enough to fill in well
under a second, so a test can run stowage on a disk at 100%. The fixture always unmounts it and
detaches its loop device, also when the test fails, and every command it runs has a timeout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.loopfs import loop_mounted

from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

DriverFactory = Callable[..., VolumeDriver]

FS_BYTES = 16 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A freshly made, mounted 16 MiB ext4 filesystem (no blocks reserved for root, since
    stowage runs as root and would use them anyway)."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    missing = [t for t in ("mkfs.ext4", "losetup", "mount", "umount") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian: e2fsprogs, util-linux, mount)")
    with loop_mounted(
        tmp_path / "fs.img", tmp_path / "mnt", FS_BYTES, ("mkfs.ext4", "-q", "-F", "-m", "0")
    ) as mnt:
        yield mnt


@pytest.fixture
def fs_settings(small_fs: Path) -> Settings:
    return Settings(socket_path=small_fs / "unused.sock", root=small_fs / "root")


@pytest.fixture
def make_fs_driver(fs_settings: Settings) -> Iterator[DriverFactory]:
    """Drivers on a root on `small_fs`; a second one is a daemon restart. Closed before the
    filesystem is unmounted (the fixture depends on it)."""
    made: list[VolumeDriver] = []

    def make() -> VolumeDriver:
        fs_settings.root.mkdir(mode=0o700, exist_ok=True)
        driver = VolumeDriver(StateStore(fs_settings.state_path), build_backends(fs_settings))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()
