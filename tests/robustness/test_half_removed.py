"""A Remove that stops half-way (issue 12, item 4): the record is marked `removing` but still
there. Whatever step failed, the volume must look the same through the protocol (Get, Path,
Mount: not found; List: absent, also from List's cached answer), a second Remove or a Create
of the name must finish it, and a restart must finish it once and then have nothing to do.

Failures are injected at the step boundaries of Remove: after the intent is recorded (the
backend fails, as with the old "ENOSPC ... trash"), after the data is gone (the state write
that drops the record fails), and a kill -9 right after the intent was recorded."""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from plugin.api import create_app
from plugin.backends.local import LocalBackend
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import BackendError, StateError
from plugin.settings import Settings
from plugin.wiring import build_backends

ID = "a" * 64
Step = Callable[[pytest.MonkeyPatch, VolumeDriver], None]


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


def call(client: FlaskClient, op: str, **body: Any) -> tuple[int, Any]:
    resp = client.post(f"/VolumeDriver.{op}", data=json.dumps(body).encode())
    return resp.status_code, resp.get_json(force=True)


def ok(client: FlaskClient, op: str, **body: Any) -> Any:
    status, answer = call(client, op, **body)
    assert (status, answer["Err"]) == (200, ""), answer
    return answer


def listed(client: FlaskClient) -> list[str]:
    return sorted(v["Name"] for v in ok(client, "List")["Volumes"])


def data_dir(settings: Settings, name: str) -> Path:
    return settings.root / "volumes" / name / "data"


def backend_fails_once(monkeypatch: pytest.MonkeyPatch, driver: VolumeDriver) -> None:
    """The backend raises what the old code raised on a full disk, after the intent was
    recorded and before any data was touched."""
    real = LocalBackend.remove
    calls = []

    def remove(self: LocalBackend, record: Any) -> None:
        calls.append(record.name)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.trash_dir))
        real(self, record)

    monkeypatch.setattr(LocalBackend, "remove", remove)


def dropping_the_record_fails_once(monkeypatch: pytest.MonkeyPatch, driver: VolumeDriver) -> None:
    """The data is deleted, then the state write that drops the record fails."""
    real = StateStore.delete_volume
    calls = []

    def delete_volume(self: StateStore, name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise StateError(f"cannot write state database {self.path}: disk I/O error")
        real(self, name)

    monkeypatch.setattr(StateStore, "delete_volume", delete_volume)


@pytest.mark.parametrize("step", [backend_fails_once, dropping_the_record_fails_once])
@pytest.mark.parametrize("finish", ["remove", "create", "restart"])
def test_half_removed_volume_is_consistent_and_finishable(
    make_driver: Callable[[], VolumeDriver],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    step: Step,
    finish: str,
) -> None:
    driver = make_driver()
    client = create_app(driver).test_client()
    ok(client, "Create", Name="v", Opts={})
    ok(client, "Create", Name="other", Opts={})
    (data_dir(settings, "v") / "old").write_text("old data")
    assert listed(client) == ["other", "v"]  # List's answer is cached from here on
    step(monkeypatch, driver)

    status, answer = call(client, "Remove", Name="v")
    assert status == 500 and answer["Err"]

    # Half-removed: the same answer everywhere.
    for op in ("Get", "Path"):
        status, answer = call(client, op, Name="v")
        assert status == 500 and "not found" in answer["Err"], (op, answer)
    status, answer = call(client, "Mount", Name="v", ID=ID)
    assert status == 500 and "not found" in answer["Err"]
    assert listed(client) == ["other"]

    if finish == "remove":
        ok(client, "Remove", Name="v")
    elif finish == "create":
        ok(client, "Create", Name="v", Opts={})
        assert list(data_dir(settings, "v").iterdir()) == []  # never the old data
        ok(client, "Remove", Name="v")
    else:
        driver.close()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            restarted = make_driver()
            restarted.recover()
            again = make_driver()  # and once more: nothing is left to finish
            again.recover()
        client = create_app(again).test_client()
        finishing = [r for r in caplog.records if "interrupted remove" in r.getMessage()]
        assert len(finishing) <= 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    assert listed(client) == ["other"]
    assert not (settings.root / "volumes" / "v").exists()
    ok(client, "Create", Name="v", Opts={})
    assert list(data_dir(settings, "v").iterdir()) == []
    assert listed(client) == ["other", "v"]


def test_killed_after_the_intent_was_recorded(
    make_driver: Callable[[], VolumeDriver], settings: Settings
) -> None:
    """kill -9 between recording the intent and deleting: before recovery has run, the
    restarted daemon answers consistently and a Remove of the volume finishes it."""
    first = make_driver()
    first.create("v", None)
    first._store.mark_removing("v")
    first.close()
    second = make_driver()
    client = create_app(second).test_client()
    assert "not found" in call(client, "Get", Name="v")[1]["Err"]
    assert listed(client) == []
    ok(client, "Remove", Name="v")
    assert not (settings.root / "volumes" / "v").exists()
    second.recover()  # finds nothing left to do
    assert listed(client) == []


def test_create_says_what_went_wrong_when_the_removal_cannot_be_finished(
    make_driver: Callable[[], VolumeDriver], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = make_driver()
    driver.create("v", None)
    driver._store.mark_removing("v")
    driver.close()
    driver = make_driver()

    def refuse(self: LocalBackend, record: Any) -> None:
        raise BackendError("cannot remove data directory: Read-only file system")

    monkeypatch.setattr(LocalBackend, "remove", refuse)
    with pytest.raises(BackendError, match="an earlier Remove of it did not finish") as info:
        driver.create("v", None)
    assert "Read-only file system" in str(info.value)
    monkeypatch.undo()
    driver.create("v", None)
    assert [name for name, _ in driver.list()] == ["v"]
