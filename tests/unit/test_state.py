from pathlib import Path

import pytest

from plugin.driver.state import StateStore, current_boot_id
from plugin.errors import StateError
from plugin.records import VolumeRecord


def record(name: str) -> VolumeRecord:
    return VolumeRecord(name, "local", {"uid": "1000"}, "2026-01-01T00:00:00Z")


def test_volumes_and_mounts_survive_reopening(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db", boot_id="b1")
    store.add_volume(record("v1"))
    store.add_volume(record("v2"))
    store.set_mount_count("v1", "id1", 2)
    store.mark_removing("v2")
    store.close()

    loaded = StateStore(tmp_path / "s.db", boot_id="b1").load()
    assert loaded.volumes["v1"] == record("v1")
    assert loaded.volumes["v2"].removing
    assert loaded.mounts == {"v1": {"id1": 2}}


def test_mount_ids_from_another_boot_are_dropped(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db", boot_id="before-reboot")
    store.add_volume(record("v1"))
    store.set_mount_count("v1", "old", 1)
    store.close()
    loaded = StateStore(tmp_path / "s.db", boot_id="after-reboot").load()
    assert loaded.mounts == {}
    assert loaded.stale_mounts_dropped == 1
    assert "v1" in loaded.volumes


def test_deleting_a_volume_deletes_its_mounts(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db", boot_id="b")
    store.add_volume(record("v1"))
    store.set_mount_count("v1", "id", 1)
    store.delete_volume("v1")
    assert store.load().mounts == {}


def test_failed_write_leaves_previous_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db", boot_id="b")
    store.add_volume(record("v1"))
    with pytest.raises(StateError, match="cannot write state database"):
        store.add_volume(record("v1"))  # primary key violation, rolled back
    assert list(store.load().volumes) == ["v1"]


def test_state_file_is_private(tmp_path: Path) -> None:
    StateStore(tmp_path / "s.db").close()
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store._transaction(durable=True) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    store.close()
    with pytest.raises(StateError, match="newer than this stowage understands"):
        StateStore(tmp_path / "s.db")


def test_boot_id_is_read_from_the_kernel() -> None:
    assert len(current_boot_id()) == 36
