"""Robustness tier: full filesystems, half-finished operations and leftovers of crashes.

`small_fs` is a 16 MiB ext4 filesystem on a loop device (root): small enough to fill in well
under a second, so a test can run stowage on a disk at 100%. The fixture always unmounts it and
detaches its loop device, also when the test fails, and every command it runs has a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

DriverFactory = Callable[..., VolumeDriver]

FS_BYTES = 16 << 20
COMMAND_TIMEOUT_S = 60


def _run(*argv: str) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    ).stdout


def _loop_devices(image: Path) -> list[str]:
    out = _run("losetup", "--noheadings", "--output", "NAME", "-j", str(image))
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A freshly made, mounted 16 MiB ext4 filesystem (no blocks reserved for root, since
    stowage runs as root and would use them anyway)."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    missing = [t for t in ("mkfs.ext4", "losetup", "mount", "umount") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian: e2fsprogs, util-linux, mount)")
    image = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(FS_BYTES)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    try:
        _run("mount", "-o", "loop", str(image), str(mnt))
        yield mnt
    finally:
        if os.path.ismount(mnt):
            try:
                _run("umount", str(mnt))
            except subprocess.SubprocessError:
                _run("umount", "-l", str(mnt))  # something still holds it: detach lazily
        for device in _loop_devices(image):
            _run("losetup", "-d", device)
        assert _loop_devices(image) == [], f"loop device of {image} left attached"


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
