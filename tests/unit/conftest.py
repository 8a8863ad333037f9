from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

DriverFactory = Callable[..., VolumeDriver]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return Settings(
        socket_path=tmp_path / "s.sock", root=tmp_path / "root", allowed_paths=(allowed,)
    )


@pytest.fixture
def make_driver(settings: Settings) -> Iterator[DriverFactory]:
    """Builds drivers on one root; a second one is a daemon restart (rclone's test pattern)."""
    made: list[VolumeDriver] = []

    def make(boot_id: str = "boot-1") -> VolumeDriver:
        settings.root.mkdir(parents=True, exist_ok=True)
        store = StateStore(settings.state_path, boot_id=boot_id)
        driver = VolumeDriver(store, build_backends(settings))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def driver(make_driver: DriverFactory) -> VolumeDriver:
    return make_driver()
