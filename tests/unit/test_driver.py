"""Driver core with the real local backend on a temporary root. A restart is a second driver on
the same root; a reboot is a second driver with another boot id."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from plugin.backends import mounts
from plugin.driver import VolumeDriver
from plugin.errors import (
    InvalidNameError,
    InvalidOptionError,
    MountError,
    VolumeConflictError,
    VolumeNotFoundError,
)
from plugin.settings import Settings

ID1 = "1" * 64
ID2 = "2" * 64

DriverFactory = Callable[..., VolumeDriver]  # the make_driver fixture

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts and chown need root")


def data_dir(settings: Settings, encoded: str) -> Path:
    return settings.root / "volumes" / encoded / "data"


def test_create_makes_data_dir_and_get_reports_it(driver: VolumeDriver, settings: Settings) -> None:
    driver.create("v1", None)
    info = driver.get("v1")
    assert info.mountpoint == str(data_dir(settings, "v1"))
    assert Path(info.mountpoint).is_dir()
    assert datetime.fromisoformat(info.created_at).tzinfo is not None
    assert info.status["backend"] == "local"
    assert info.status["mounts"] == 0
    assert info.status["options"] == {}
    assert info.status["created_at"] == info.created_at


def test_create_is_idempotent_but_refuses_different_options(driver: VolumeDriver) -> None:
    driver.create("v1", {"mode": "0700"})
    created = driver.get("v1").created_at
    driver.create("v1", {"mode": "0700"})
    assert driver.get("v1").created_at == created
    with pytest.raises(VolumeConflictError, match="already exists with different options"):
        driver.create("v1", {"mode": "0755"})


def test_unknown_volume_errors(driver: VolumeDriver) -> None:
    for call in (driver.get, driver.path, driver.remove):
        with pytest.raises(VolumeNotFoundError, match="volume 'nope' not found"):
            call("nope")
    with pytest.raises(VolumeNotFoundError):
        driver.mount("nope", ID1)
    driver.unmount("nope", ID1)  # Unmount of anything unknown succeeds


def test_invalid_input_writes_nothing(driver: VolumeDriver, settings: Settings) -> None:
    before = sorted(settings.root.rglob("*"))
    with pytest.raises(InvalidNameError):
        driver.create("../escape", None)
    with pytest.raises(InvalidOptionError, match="unknown option 'bogus'"):
        driver.create("v", {"bogus": "1"})
    assert driver.list() == []
    assert sorted(settings.root.rglob("*")) == before


def test_names_with_slashes_stay_inside_root(driver: VolumeDriver, settings: Settings) -> None:
    driver.create("tenant1/data", None)
    mountpoint = Path(driver.mount("tenant1/data", ID1))
    assert mountpoint == data_dir(settings, "tenant1%2Fdata")
    assert driver.list() == [("tenant1/data", str(mountpoint))]


def test_same_id_mounted_twice_counts_twice(driver: VolumeDriver) -> None:
    driver.create("v", None)
    first = driver.mount("v", ID1)
    assert driver.mount("v", ID1) == first  # docker cp re-mounts with the same ID
    driver.mount("v", ID2)
    assert driver.get("v").status["mounts"] == 3
    driver.unmount("v", ID1)
    driver.unmount("v", ID1)
    driver.unmount("v", ID1)  # one too many: ignored
    assert driver.get("v").status["mounts"] == 1
    driver.unmount("v", ID2)
    assert driver.get("v").status["mounts"] == 0


def test_restart_keeps_volumes_options_and_mount_ids(make_driver: DriverFactory) -> None:
    first = make_driver()
    first.create("v", {"mode": "0750"})
    created = first.get("v").created_at
    first.mount("v", ID1)
    first.close()

    second = make_driver()
    info = second.get("v")
    assert info.created_at == created
    assert info.status["options"] == {"mode": "0750"}
    assert info.status["mounts"] == 1
    second.unmount("v", ID1)
    assert second.get("v").status["mounts"] == 0


def test_reboot_drops_mount_ids_and_remove_proceeds(make_driver: DriverFactory) -> None:
    first = make_driver(boot_id="boot-1")
    first.create("v", None)
    first.mount("v", ID1)
    first.close()
    second = make_driver(boot_id="boot-2")
    assert second.get("v").status["mounts"] == 0
    second.remove("v")
    assert second.list() == []


def test_remove_with_stale_counts_proceeds(driver: VolumeDriver, settings: Settings) -> None:
    driver.create("v", None)
    driver.mount("v", ID1)  # its Unmount never comes (a crashed dockerd)
    driver.remove("v")
    assert not (settings.root / "volumes" / "v").exists()
    with pytest.raises(VolumeNotFoundError):
        driver.get("v")


def test_remove_deletes_managed_data(driver: VolumeDriver, settings: Settings) -> None:
    driver.create("v", None)
    (Path(driver.mount("v", ID1)) / "file").write_text("x")
    driver.unmount("v", ID1)
    driver.remove("v")
    assert not (settings.root / "volumes" / "v").exists()
    assert not any((settings.root / "trash").iterdir())


def test_interrupted_remove_is_finished_at_recovery(
    make_driver: DriverFactory, settings: Settings
) -> None:
    first = make_driver()
    first.create("v", None)
    first._store.mark_removing("v")  # the crash came right after the intent was recorded
    first.close()
    second = make_driver()
    with pytest.raises(VolumeNotFoundError):
        second.get("v")
    assert data_dir(settings, "v").exists()
    second.recover()
    assert not (settings.root / "volumes" / "v").exists()
    second.create("v", None)  # the name is free again
    assert second.get("v").status["mounts"] == 0


def test_create_over_interrupted_remove_starts_empty(
    make_driver: DriverFactory, settings: Settings
) -> None:
    first = make_driver()
    first.create("v", None)
    (data_dir(settings, "v") / "old").write_text("x")
    first._store.mark_removing("v")
    first.close()
    second = make_driver()
    second.create("v", None)
    assert list(data_dir(settings, "v").iterdir()) == []


@needs_root
def test_path_volume_serves_host_dir_and_remove_keeps_it(
    driver: VolumeDriver, settings: Settings
) -> None:
    host = settings.allowed_paths[0] / "share"
    host.mkdir()
    (host / "keep").write_text("precious")
    driver.create("p", {"path": str(host)})
    # A bind of the opened directory, never the path string (tests/security/test_path_volumes).
    mountpoint = Path(driver.mount("p", ID1))
    try:
        assert mountpoint == settings.root / "mounts" / "p" == Path(driver.path("p"))
        assert (mountpoint / "keep").read_text() == "precious"
    finally:
        driver.unmount("p", ID1)
    assert not mounts.is_mountpoint(mountpoint)
    driver.remove("p")
    assert (host / "keep").read_text() == "precious"


def test_path_outside_allowed_roots_is_refused(driver: VolumeDriver, settings: Settings) -> None:
    with pytest.raises(InvalidOptionError, match="not under an allowed path"):
        driver.create("p", {"path": "/etc"})
    escape = settings.allowed_paths[0] / "link"
    escape.symlink_to("/etc")
    with pytest.raises(InvalidOptionError, match=r"resolved to /etc\) is not under"):
        driver.create("p", {"path": str(escape)})
    with pytest.raises(InvalidOptionError, match="not an existing directory"):
        driver.create("p", {"path": str(settings.allowed_paths[0] / "missing")})


def test_path_volumes_disabled_without_allowed_paths(tmp_path: Path) -> None:
    from plugin.driver.state import StateStore
    from plugin.wiring import build_backends

    settings = Settings(root=tmp_path / "root")
    settings.root.mkdir()
    driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    with pytest.raises(InvalidOptionError, match="--allowed-path"):
        driver.create("p", {"path": str(tmp_path)})
    driver.close()


def test_mount_of_vanished_host_dir_fails_clearly(driver: VolumeDriver, settings: Settings) -> None:
    host = settings.allowed_paths[0] / "gone"
    host.mkdir()
    driver.create("p", {"path": str(host)})
    host.rmdir()
    with pytest.raises(MountError, match=f"host directory {host} of volume 'p' no longer exists"):
        driver.mount("p", ID1)
    assert driver.get("p").status["mounts"] == 0


@needs_root
def test_uid_gid_mode_apply_to_volume_root(driver: VolumeDriver) -> None:
    driver.create("v", {"uid": "1000", "gid": "1001", "mode": "0770"})
    st = os.stat(driver.get("v").mountpoint)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1001, 0o770)


@needs_root
def test_readonly_volume_is_a_readonly_bind(driver: VolumeDriver, settings: Settings) -> None:
    driver.create("ro", {"readonly": "true"})
    (data_dir(settings, "ro") / "seed").write_text("x")
    mountpoint = Path(driver.mount("ro", ID1))
    try:
        assert mountpoint != data_dir(settings, "ro")
        assert mounts.is_mountpoint(mountpoint)
        assert (mountpoint / "seed").read_text() == "x"
        with pytest.raises(OSError, match="Read-only file system"):
            (mountpoint / "new").write_text("y")
        driver.mount("ro", ID2)
        driver.unmount("ro", ID1)
        assert mounts.is_mountpoint(mountpoint)  # still used by ID2
    finally:
        driver.unmount("ro", ID1)
        driver.unmount("ro", ID2)
    assert not mounts.is_mountpoint(mountpoint)


@needs_root
def test_readonly_mount_is_restored_after_restart(
    make_driver: DriverFactory, settings: Settings
) -> None:
    first = make_driver()
    first.create("ro", {"readonly": "true"})
    mountpoint = Path(first.mount("ro", ID1))
    mounts.lazy_unmount(mountpoint)  # lost, e.g. by a mount namespace change
    first.close()
    second = make_driver()
    try:
        second.recover()
        assert mounts.is_mountpoint(mountpoint)
    finally:
        second.remove("ro")
    assert not mounts.is_mountpoint(mountpoint)


def test_capabilities_scope_is_local(driver: VolumeDriver) -> None:
    assert driver.capabilities() == "local"


@needs_root
def test_mount_root_hands_docker_binds_under_it(tmp_path: Path) -> None:
    """A managed plugin: every Mountpoint must lie under its PropagatedMount."""
    from plugin.driver.state import StateStore
    from plugin.wiring import build_backends

    settings = Settings(root=tmp_path / "root", mount_root=tmp_path / "propagated")
    settings.root.mkdir()
    driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    try:
        driver.create("rw", None)
        driver.create("ro", {"readonly": "true"})
        rw = Path(driver.mount("rw", ID1))
        ro = Path(driver.mount("ro", ID1))
        assert rw.parent == ro.parent == settings.mount_root
        assert driver.get("rw").mountpoint == str(rw)
        (rw / "f").write_text("x")
        assert (data_dir(settings, "rw") / "f").read_text() == "x"
        with pytest.raises(OSError, match="Read-only file system"):
            (ro / "f").write_text("x")
        driver.unmount("rw", ID1)
        driver.unmount("ro", ID1)
        assert not mounts.is_mountpoint(rw) and not mounts.is_mountpoint(ro)
    finally:
        driver.close()
