"""`stowage volume backup/restore` on local volumes: trees (incremental) and .tar.gz archives
interchangeable with the classic `tar czf backup.tar.gz -C /data .` recipe."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.cli import main
from plugin.driver import VolumeDriver
from plugin.driver.state import current_boot_id
from plugin.settings import Settings

DriverFactory = Callable[..., VolumeDriver]


def tree(root: Path) -> dict[str, object]:
    result: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            result[rel] = ("dir", path.stat().st_mode & 0o7777)
        else:
            result[rel] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return result


@pytest.fixture
def filled(driver: VolumeDriver) -> Path:
    driver.create("src", None)
    data = Path(driver.get("src").mountpoint)
    (data / "dir with space").mkdir()
    (data / "dir with space" / "ü.txt").write_text("unicode\n")
    (data / "script.sh").write_text("#!/bin/sh\n")
    (data / "script.sh").chmod(0o750)
    (data / "empty").mkdir()
    os.symlink("script.sh", data / "link")
    (data / "big.bin").write_bytes(os.urandom(3 << 20))
    return data


def cli(settings: Settings, *args: str) -> int:
    return main(["volume", *args, "--root", str(settings.root)])


@pytest.mark.parametrize("dest_name", ["tree", "backup.tar.gz"])
def test_backup_then_restore_round_trip(
    driver: VolumeDriver, settings: Settings, filled: Path, tmp_path: Path, dest_name: str
) -> None:
    dest = tmp_path / dest_name
    assert cli(settings, "backup", "src", str(dest)) == 0
    driver.create("dst", None)
    assert cli(settings, "restore", str(dest), "dst") == 0
    assert tree(Path(driver.get("dst").mountpoint)) == tree(filled)


def test_archive_is_compatible_with_tar_both_ways(
    driver: VolumeDriver, settings: Settings, filled: Path, tmp_path: Path
) -> None:
    ours = tmp_path / "ours.tar.gz"
    assert cli(settings, "backup", "src", str(ours)) == 0
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(ours), "-C", str(unpacked)], check=True)
    assert tree(unpacked) == tree(filled)
    theirs = tmp_path / "theirs.tar.gz"
    subprocess.run(["tar", "czf", str(theirs), "-C", str(filled), "."], check=True)
    driver.create("dst", None)
    assert cli(settings, "restore", str(theirs), "dst") == 0
    assert tree(Path(driver.get("dst").mountpoint)) == tree(filled)


def test_restore_refuses_unknown_and_mounted_volumes(
    make_driver: DriverFactory,
    driver: VolumeDriver,
    settings: Settings,
    filled: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    assert cli(settings, "restore", str(backup), "nope") == 2
    assert "volume 'nope' not found" in capsys.readouterr().err
    driver.close()
    live = make_driver(boot_id=current_boot_id())  # the CLI checks mounts of this boot
    live.mount("src", "1" * 64)
    assert cli(settings, "restore", str(backup), "src") == 2
    assert "in use by a container" in capsys.readouterr().err
