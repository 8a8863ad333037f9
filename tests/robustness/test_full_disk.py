"""Remove on a filesystem at 100% (issue 12, item 4): it must succeed and give the space back,
and stowage must keep working afterwards. The volume's data and the state database share the
filesystem of --root, as they do by default."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.driver import VolumeDriver
from plugin.settings import Settings

DriverFactory = Callable[[], VolumeDriver]  # the make_fs_driver fixture (conftest.py)


def fill(directory: Path) -> int:
    """Write files into *directory* until the filesystem takes not one more byte (nor a new
    file); returns the bytes written."""
    written = 0
    for i, chunk in enumerate((1 << 20, 1 << 16, 1 << 12, 1 << 9, 1)):
        try:
            fd = os.open(directory / f"fill{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        buf = b"x" * chunk
        try:
            while True:
                written += os.write(fd, buf)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def data_dir(settings: Settings, name: str) -> Path:
    return settings.root / "volumes" / name / "data"


def fill_filesystem(settings: Settings, big: str, filler: str) -> int:
    """Fill *big* until ENOSPC, then whatever is left (and what delayed allocation gives back)
    with *filler*; returns the bytes *big* holds."""
    held = fill(data_dir(settings, big))
    fill(data_dir(settings, filler))
    fill(data_dir(settings, filler))
    assert free_bytes(settings.root) < 16 << 10
    with pytest.raises(OSError, match="No space left"):
        (settings.root / "probe").write_bytes(b"x" * (64 << 10))
    return held


@pytest.mark.parametrize(
    "setup",
    [
        # The state's WAL has room for a small write (a checkpoint ran before the disk filled),
        # and the trash directory was never made: the "ENOSPC ... trash".
        "checkpointed",
        # The WAL has no room left and the checkpoint cannot grow the database.
        "wal-full",
        # A restarted daemon: recovery ran before the disk filled.
        "after-restart",
    ],
)
def test_remove_on_a_full_filesystem_frees_the_space(
    make_fs_driver: DriverFactory, fs_settings: Settings, setup: str
) -> None:
    driver = make_fs_driver()
    driver.create("big", None)
    driver.create("filler", None)
    if setup == "after-restart":
        driver.close()
        driver = make_fs_driver()
        driver.recover()
    if setup == "checkpointed":
        with sqlite3.connect(fs_settings.state_path, isolation_level=None) as db:
            db.execute("PRAGMA wal_checkpoint(RESTART)")
        db.close()
    held = fill_filesystem(fs_settings, "big", "filler")
    assert held > 4 << 20

    driver.remove("big")

    assert free_bytes(fs_settings.root) >= held * 9 // 10
    assert driver.list() == [("filler", str(data_dir(fs_settings, "filler")))]
    assert not (fs_settings.root / "volumes" / "big").exists()
    driver.create("new", None)
    (data_dir(fs_settings, "new") / "f").write_bytes(b"y" * (1 << 20))
    assert sorted(name for name, _ in driver.list()) == ["filler", "new"]

    # A restart finds exactly that, and nothing pending.
    driver.close()
    again = make_fs_driver()
    again.recover()
    assert sorted(name for name, _ in again.list()) == ["filler", "new"]
    assert not any((fs_settings.root / "trash").iterdir())


def test_second_remove_on_a_refilled_filesystem(
    make_fs_driver: DriverFactory, fs_settings: Settings
) -> None:
    """The room a full-disk Remove needs for its state is there again for the next one."""
    driver = make_fs_driver()
    for name in ("a", "b", "c"):
        driver.create(name, None)
    fill_filesystem(fs_settings, "a", "c")
    driver.remove("a")
    held = fill_filesystem(fs_settings, "b", "c")
    driver.remove("b")
    assert free_bytes(fs_settings.root) >= held * 9 // 10
    assert driver.list() == [("c", str(data_dir(fs_settings, "c")))]
    driver.remove("c")
    assert driver.list() == []
