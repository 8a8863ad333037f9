"""`stowage volume backup/restore` find a volume's files where the local backend keeps them:
the layout is known in one place (plugin.backends.local), so changing it cannot silently make
backups read an empty or missing directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.backends import local as local_mod
from plugin.cli import main
from plugin.driver import VolumeDriver
from plugin.driver.backup import volume_data_dir
from plugin.names import encode_name
from plugin.settings import Settings

DriverFactory = Callable[..., VolumeDriver]


@pytest.mark.parametrize("layout", ["as shipped", "moved"])
def test_backup_and_restore_follow_the_local_backends_layout(
    make_driver: DriverFactory,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
) -> None:
    if layout == "moved":
        monkeypatch.setattr(local_mod, "VOLUMES_DIR", "elsewhere")
    driver = make_driver()
    driver.create("src", None)
    driver.create("dst", None)
    src = Path(driver.get("src").mountpoint)
    (src / "kept.txt").write_text("the volume's own file\n")
    if layout == "moved":
        assert src == settings.root / "elsewhere" / encode_name("src") / "data"
    assert volume_data_dir(settings.root, "src") == src

    dest = tmp_path / "backup"
    root = ["--root", str(settings.root)]
    assert main(["volume", "backup", "src", str(dest), *root]) == 0
    assert (dest / "kept.txt").read_text() == "the volume's own file\n"
    assert main(["volume", "restore", str(dest), "dst", *root]) == 0
    dst = Path(driver.get("dst").mountpoint)
    assert (dst / "kept.txt").read_text() == "the volume's own file\n"
