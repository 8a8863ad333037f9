"""The state database and SQLite's side files hold volume names and options: 0600, all of
them, whatever the umask and the mode of an existing --root (issue 12, item 5)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.driver.state import StateStore
from plugin.records import VolumeRecord


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in root.iterdir() if p.name.startswith("state")}


@pytest.mark.usefixtures("umask_022")
def test_database_wal_and_shm_are_private_in_an_existing_0755_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    store = StateStore(root / "state.db")
    try:
        store.add_volume(VolumeRecord("v", "local", {"uid": "1000"}, "2026-01-01T00:00:00Z"))
        store.set_mount_count("v", "id", 1)
        found = modes(root)
        assert {"state.db", "state.db-wal", "state.db-shm"} <= set(found)
        assert set(found.values()) == {0o600}, found
    finally:
        store.close()


@pytest.mark.usefixtures("umask_022")
def test_side_files_left_0644_by_a_killed_daemon_are_made_private(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    killed = StateStore(root / "state.db")  # never closed: kill -9 leaves -wal and -shm
    killed.add_volume(VolumeRecord("v", "local", {}, "2026-01-01T00:00:00Z"))
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (root / name).chmod(0o644)  # as an older stowage left them
    store = StateStore(root / "state.db")
    try:
        assert "v" in store.load().volumes
        found = modes(root)
        assert {"state.db", "state.db-wal", "state.db-shm"} <= set(found)
        assert set(found.values()) == {0o600}, found
    finally:
        store.close()
        killed.close()
