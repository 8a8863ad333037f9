"""Data directories with no state row (issue 12, item 4). Create makes the directory, then
records the volume; a kill -9 in between leaves a directory no record names. Recovery deletes
it (and says so), and a Create never reuses a directory it did not make for its record. A
directory with files but no record (a replaced state database) is kept, never deleted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import BackendError
from plugin.names import encode_name
from plugin.settings import Settings
from plugin.wiring import build_backends


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(socket_path=tmp_path / "s.sock", root=tmp_path / "root")


@pytest.fixture
def make_driver(settings: Settings) -> Iterator[Callable[[], VolumeDriver]]:
    made: list[VolumeDriver] = []

    def make() -> VolumeDriver:
        settings.root.mkdir(parents=True, exist_ok=True)
        driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


def volume_dir(settings: Settings, name: str) -> Path:
    return settings.root / "volumes" / encode_name(name)


def interrupted_create(
    driver: VolumeDriver, settings: Settings, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A Create killed after the backend made the directory, before the record was written."""

    def killed(self: StateStore, record: object) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(StateStore, "add_volume", killed)
        with pytest.raises(Killed):
            driver.create(name, {"mode": "0700"})
    assert (volume_dir(settings, name) / "data").is_dir()


def test_recovery_deletes_directories_of_interrupted_creates(
    make_driver: Callable[[], VolumeDriver],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make_driver()
    first.create("kept", None)
    (volume_dir(settings, "kept") / "data" / "f").write_text("mine")
    for name in ("a", "tenant/b"):
        interrupted_create(first, settings, monkeypatch, name)
    first.close()

    second = make_driver()
    with caplog.at_level(logging.INFO):
        second.recover()
    assert [p.name for p in (settings.root / "volumes").iterdir()] == ["kept"]
    assert (volume_dir(settings, "kept") / "data" / "f").read_text() == "mine"
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'a'" in logged and "'tenant/b'" in logged and "interrupted" in logged
    assert not any((settings.root / "trash").iterdir())

    second.create("a", None)
    assert list((volume_dir(settings, "a") / "data").iterdir()) == []
    assert sorted(name for name, _ in second.list()) == ["a", "kept"]


def test_create_does_not_reuse_a_leftover_directory(
    make_driver: Callable[[], VolumeDriver], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No restart in between: the Create itself replaces the leftover with a new directory."""
    driver = make_driver()
    interrupted_create(driver, settings, monkeypatch, "v")
    stale = volume_dir(settings, "v") / "stale-state"  # e.g. a staging state file
    stale.write_text("from the interrupted Create")
    driver.create("v", None)
    assert not stale.exists()
    assert sorted(p.name for p in volume_dir(settings, "v").iterdir()) == ["data"]
    assert list((volume_dir(settings, "v") / "data").iterdir()) == []
    assert (volume_dir(settings, "v") / "data").stat().st_mode & 0o777 == 0o755


def test_directory_with_files_but_no_record_is_kept_and_create_says_what_to_do(
    make_driver: Callable[[], VolumeDriver],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a replaced state database looks like: data no record names. Not stowage's to
    delete, and not to hand to a new volume of that name either."""
    data = volume_dir(settings, "precious") / "data"
    data.mkdir(parents=True)
    (data / "db.sqlite").write_text("years of work")
    driver = make_driver()
    with caplog.at_level(logging.WARNING):
        driver.recover()
    assert (data / "db.sqlite").read_text() == "years of work"
    assert any("keeping" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendError, match="no record of") as info:
        driver.create("precious", None)
    assert "move" in str(info.value) and str(volume_dir(settings, "precious")) in str(info.value)
    assert (data / "db.sqlite").read_text() == "years of work"
    assert driver.list() == []
