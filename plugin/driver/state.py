"""Durable driver state in SQLite.

Why SQLite: every change is one transaction, so `kill -9` at any instant leaves either the old or
the new state, never half a record; and it stays fast at 10,000+ volumes, where rewriting a JSON
file per change (rclone's approach) is O(n) per call.

Durability is chosen per table: volume records are committed with `synchronous=FULL` (survive
power loss: Docker forgets volumes whose Get fails at boot), mount counts with `NORMAL` in WAL
mode (survive a crash of the daemon; after a power loss they are stale anyway and dropped by the
boot-id check).

A full filesystem. A Remove is how space gets freed, so its writes must succeed on a full disk:
in WAL mode every transaction appends frames to `state.db-wal`, and a checkpoint may grow
`state.db`, and both need free blocks (`database or disk is full` otherwise). The store keeps a
reserve file (`state.db-reserve`, RESERVE_BYTES of incompressible data) on the same filesystem:
a write on the removal path (`frees=True`) that fails with SQLITE_FULL deletes the reserve and
is retried once, so marking a volume as removing and dropping its record always complete, and the
backend then frees the volume's own space. The reserve is made again after a volume record is
deleted (space was just freed) and at every start, when there is room. Create and Mount never
spend it: on a full disk they fail, and Remove keeps working.

Files are private (0600): they hold volume names and options. SQLite creates `-wal` and `-shm`
with the mode of the database file, so the database is created 0600 before SQLite opens it
(chmod afterwards would leave the first `-wal`/`-shm` with the umask's 0644).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from plugin.atomic import write_atomically
from plugin.errors import StateError
from plugin.records import VolumeRecord

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHECKPOINT_INTERVAL_S = 1.0
#: Size of the reserve file: about 250 WAL frames, many removals' worth of state writes.
RESERVE_BYTES = 1 << 20
#: Files next to the database that SQLite makes in WAL mode.
_SIDE_FILES = ("-wal", "-shm")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    name       TEXT PRIMARY KEY,
    backend    TEXT NOT NULL,
    options    TEXT NOT NULL,            -- JSON object of str -> str, as validated at Create
    created_at TEXT NOT NULL,            -- RFC 3339, UTC
    removing   INTEGER NOT NULL DEFAULT 0 -- 1 while a Remove is in flight: finish it at start
);
CREATE TABLE IF NOT EXISTS mounts (
    name     TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    mount_id TEXT NOT NULL,
    count    INTEGER NOT NULL CHECK (count > 0),
    boot_id  TEXT NOT NULL,
    PRIMARY KEY (name, mount_id)
);
"""


@dataclass
class LoadedState:
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    #: name -> {Docker mount ID -> count}, only IDs from the current boot.
    mounts: dict[str, dict[str, int]] = field(default_factory=dict)
    stale_mounts_dropped: int = 0


def current_boot_id() -> str:
    """The kernel's boot id: mount IDs recorded under another boot id are from before a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class StateStore:
    """All durable state of the driver. Thread-safe; every method is one transaction."""

    def __init__(self, path: Path, boot_id: str | None = None) -> None:
        self.path = path
        self.boot_id = boot_id or current_boot_id()
        self._lock = threading.Lock()
        self.reserve_path = path.with_name(path.name + "-reserve")
        self._checkpoint_failing = False
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _make_private(path)
        except OSError as exc:
            raise StateError(f"cannot create state database {path}: {exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Checkpoints (which fsync the database file) run in a background thread instead
            # of inside whichever request happens to cross the WAL threshold: keeps Mount's
            # tail latency at a WAL append.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
            self._check_schema_version()
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {path}: {exc}") from exc
        for suffix in _SIDE_FILES:  # left 0644 by earlier stowage (chmod after open)
            side = path.with_name(path.name + suffix)
            with suppress(FileNotFoundError):
                side.chmod(0o600)
        self.replenish_reserve()
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="state-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    # Said once, not every second: on a full disk it fails until space is freed.
                    if not self._checkpoint_failing:
                        log.warning("state checkpoint failed (retrying quietly): %s", exc)
                    self._checkpoint_failing = True
                else:
                    if self._checkpoint_failing:
                        log.info("state checkpoint works again")
                    self._checkpoint_failing = False
        finally:
            db.close()

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema version {row[0]}, newer than this "
                f"stowage understands ({SCHEMA_VERSION}); upgrade stowage instead of downgrading"
            )

    @contextmanager
    def _transaction(self, durable: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT (SQLITE_FULL, SQLITE_IOERR) may leave the transaction open,
                # and then every later BEGIN would fail too: end it here.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as rollback_exc:
                        log.warning("rollback after a failed state write failed: %s", rollback_exc)
                raise StateError(f"cannot write state database {self.path}: {exc}") from exc

    def _write(
        self, durable: bool, frees: bool, body: Callable[[sqlite3.Connection], object]
    ) -> None:
        """One transaction running *body*. *frees*: a write on the way to freeing space (a
        Remove), which may spend the reserve file when the filesystem is full."""
        try:
            with self._transaction(durable) as db:
                body(db)
        except StateError as exc:
            if not (frees and _is_full(exc.__cause__) and self._release_reserve()):
                raise
            with self._transaction(durable) as db:
                body(db)

    def _release_reserve(self) -> bool:
        """Delete the reserve file; False if there was none to delete."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot delete the state reserve file %s: %s", self.reserve_path, exc)
            return False
        log.warning(
            "the filesystem of %s is full: spent the reserve file to record a removal",
            self.path,
        )
        return True

    def replenish_reserve(self) -> None:
        """Make the reserve file if it is missing and there is room (best effort)."""
        if self.reserve_path.exists():
            return
        try:
            # Written, not fallocated: blocks that are really used, even on filesystems that
            # compress or lack fallocate. Random bytes, so compression cannot shrink it.
            write_atomically(self.reserve_path, os.urandom(RESERVE_BYTES))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.warning(
                    "no room for the state reserve file %s (the filesystem is full); "
                    "will try again after a Remove",
                    self.reserve_path,
                )
            else:
                log.warning("cannot make the state reserve file %s: %s", self.reserve_path, exc)

    def load(self) -> LoadedState:
        """Read everything, dropping mount IDs recorded under another kernel boot."""
        state = LoadedState()
        with self._transaction(durable=True) as db:
            cur = db.execute("DELETE FROM mounts WHERE boot_id != ?", (self.boot_id,))
            state.stale_mounts_dropped = cur.rowcount
            for name, backend, options, created_at, removing in db.execute(
                "SELECT name, backend, options, created_at, removing FROM volumes"
            ):
                state.volumes[name] = VolumeRecord(
                    name, backend, json.loads(options), created_at, bool(removing)
                )
            for name, mount_id, count in db.execute("SELECT name, mount_id, count FROM mounts"):
                state.mounts.setdefault(name, {})[mount_id] = count
        if state.stale_mounts_dropped:
            log.info(
                "dropped %s mount IDs recorded before the last reboot", state.stale_mounts_dropped
            )
        return state

    def add_volume(self, record: VolumeRecord) -> None:
        with self._transaction(durable=True) as db:
            db.execute(
                "INSERT INTO volumes(name, backend, options, created_at, removing) "
                "VALUES(?, ?, ?, ?, 0)",
                (record.name, record.backend, json.dumps(record.options), record.created_at),
            )

    def mark_removing(self, name: str, removing: bool = True) -> None:
        self._write(
            True,
            True,
            lambda db: db.execute(
                "UPDATE volumes SET removing=? WHERE name=?", (int(removing), name)
            ),
        )

    def delete_volume(self, name: str) -> None:
        self._write(True, True, lambda db: db.execute("DELETE FROM volumes WHERE name=?", (name,)))
        self.replenish_reserve()

    def set_mount_count(self, name: str, mount_id: str, count: int) -> None:
        with self._transaction(durable=False) as db:
            if count > 0:
                db.execute(
                    "INSERT INTO mounts(name, mount_id, count, boot_id) VALUES(?, ?, ?, ?) "
                    "ON CONFLICT(name, mount_id) DO UPDATE SET count=excluded.count, "
                    "boot_id=excluded.boot_id",
                    (name, mount_id, count, self.boot_id),
                )
            else:
                db.execute("DELETE FROM mounts WHERE name=? AND mount_id=?", (name, mount_id))

    def clear_mounts(self, name: str) -> None:
        self._write(False, True, lambda db: db.execute("DELETE FROM mounts WHERE name=?", (name,)))

    def close(self) -> None:
        """Checkpoint and close; a second call does nothing."""
        self._stop.set()
        self._checkpointer.join(timeout=10)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("final state checkpoint failed: %s", exc)
            self._db.close()


def _make_private(path: Path) -> None:
    """Create *path* 0600 if missing (whatever the umask), and make it 0600 if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _is_full(exc: BaseException | None) -> bool:
    """True for SQLite's "database or disk is full" (SQLITE_FULL), whatever the extended code."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL
