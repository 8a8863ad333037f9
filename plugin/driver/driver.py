"""The volume driver: registry, idempotent Create, mount refcounts by Docker's mount ID, and
restart recovery. It knows nothing of HTTP; the API layer translates its errors.

Locking: `_lock` guards the in-memory maps and is held only briefly. Slow work (a backend's
mount, a tree deletion) runs under a per-volume lock, so Get and List of other volumes never
wait behind it. Docker itself serialises calls per volume name; the per-volume lock makes that a
guarantee rather than an assumption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from plugin.backends.base import Backend
from plugin.driver.state import StateStore
from plugin.errors import (
    BackendError,
    MountPendingError,
    PluginError,
    VolumeConflictError,
    VolumeNotFoundError,
)
from plugin.names import validate_name
from plugin.options import check_options, split_backend
from plugin.records import VolumeRecord

log = logging.getLogger(__name__)

SCOPE = "local"


@dataclass
class _VolumeLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # holding or waiting; guarded by VolumeDriver._lock


@dataclass(frozen=True)
class VolumeInfo:
    """What Get and List report about one volume."""

    name: str
    mountpoint: str
    created_at: str
    status: dict[str, Any] = field(default_factory=dict)


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class VolumeDriver:
    def __init__(self, store: StateStore, backends: Mapping[str, Backend]) -> None:
        self._store = store
        self._backends = dict(backends)
        self._lock = threading.Lock()
        self._volume_locks: dict[str, _VolumeLock] = {}
        loaded = store.load()
        self._volumes: dict[str, VolumeRecord] = loaded.volumes
        self._mounts: dict[str, dict[str, int]] = loaded.mounts
        # Mountpoints are fixed for a volume's life; caching them keeps List of 10,000 volumes
        # in milliseconds (pathlib costs ~20 us per path).
        self._mountpoints: dict[str, str] = {}
        self._generation = 0  # bumped whenever the set of volumes changes
        log.info(
            "loaded %s volumes (%s with active mounts) from %s",
            len(self._volumes),
            len(self._mounts),
            store.path,
        )

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _volume_lock(self, name: str) -> Iterator[None]:
        """Hold the lock of volume `name` (its own: never shared with another volume, so one
        volume's slow Mount delays no other). Entries live only while someone holds or waits
        for them, so anonymous volumes coming and going leave nothing behind."""
        with self._lock:
            entry = self._volume_locks.get(name)
            if entry is None:
                entry = self._volume_locks[name] = _VolumeLock()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if not entry.users:
                    del self._volume_locks[name]

    def _record(self, name: str) -> VolumeRecord:
        with self._lock:
            record = self._volumes.get(name)
        if record is None or record.removing:
            raise VolumeNotFoundError(name)
        return record

    def _backend(self, record: VolumeRecord) -> Backend:
        backend = self._backends.get(record.backend)
        if backend is None:
            raise BackendError(
                f"volume {record.name!r} uses backend {record.backend!r}, which this stowage "
                "does not provide"
            )
        return backend

    def _active_count(self, name: str) -> int:
        with self._lock:
            return sum(self._mounts.get(name, {}).values())

    # -- protocol operations -------------------------------------------------------------------

    def create(self, name: object, raw_options: Mapping[str, str] | None) -> None:
        name = validate_name(name)
        kind, options = split_backend(raw_options, list(self._backends))
        backend = self._backends[kind]
        check_options(kind, options, {**backend.option_specs, **backend.extra_option_specs})
        options = backend.with_defaults(options)
        with self._volume_lock(name):
            existing = self._volumes.get(name)
            if existing is not None and existing.removing:
                try:
                    self._finish_remove(existing)
                except PluginError as exc:
                    raise BackendError(
                        f"cannot create volume {name!r} yet: an earlier Remove of it did not "
                        f"finish, and finishing it now failed: {exc}"
                    ) from exc
                existing = None
            if existing is not None:
                # Docker re-sends Create (e.g. after a plugin restart): same options is a no-op.
                if existing.backend == kind and existing.options == backend.canonical_options(
                    options
                ):
                    log.info("create %s: already exists with the same options", name)
                    return
                raise VolumeConflictError(
                    f"volume {name!r} already exists with different options "
                    f"(backend={existing.backend}, {_fmt(existing.options)}); remove it first "
                    "to recreate it with new options"
                )
            backend.validate(name, options)
            record = VolumeRecord(name, kind, backend.canonical_options(options), _now_rfc3339())
            backend.create(record)
            self._store.add_volume(record)
            with self._lock:
                self._volumes[name] = record
                self._mountpoints.pop(name, None)
                self._generation += 1
        log.info("created volume %s backend=%s %s", name, kind, _fmt(record.options))

    def remove(self, name: object) -> None:
        name = validate_name(name)
        with self._volume_lock(name):
            with self._lock:
                record = self._volumes.get(name)
            if record is None:
                raise VolumeNotFoundError(name)
            if record.removing:
                # An earlier Remove stopped half-way (an error after the intent was recorded):
                # Get and List no longer show the volume, but Remove of it finishes the job.
                log.info("remove %s: finishing an earlier Remove that did not complete", name)
            else:
                if self._active_count(name):
                    # Docker refuses `volume rm` while a container uses the volume, so counts
                    # that reach us are stale (a crash, a lost Unmount): proceed, don't block.
                    log.warning(
                        "remove %s: dropping stale mount IDs %s",
                        name,
                        sorted(self._mounts.get(name, {})),
                    )
                # On a full filesystem this write spends the state's reserve file (state.py),
                # and the backend then frees the volume's space without needing any.
                self._store.mark_removing(name)
                with self._lock:
                    self._volumes[name] = dataclasses.replace(record, removing=True)
                    self._generation += 1  # List's cached answer must drop it now
            self._finish_remove(record)
        log.info("removed volume %s", name)

    def _finish_remove(self, record: VolumeRecord) -> None:
        """Second half of Remove, also run at start for a Remove a crash interrupted.

        A backend may refuse (e.g. S3 data not yet uploaded): then the volume is restored,
        visible and usable, rather than left half-removed. Any other failure (the restore
        itself, dropping the record, an unexpected error) leaves it marked removing, hidden
        from Get and List; a later Remove, a Create of the name or the next start finishes it.
        """
        try:
            self._backend(record).remove(record)
        except PluginError as exc:
            try:
                self._store.mark_removing(record.name, removing=False)
            except PluginError as restore_exc:
                log.warning(
                    "remove %s failed (%s) and stays pending: %s", record.name, exc, restore_exc
                )
                raise exc from None
            with self._lock:
                self._volumes[record.name] = dataclasses.replace(record, removing=False)
                self._generation += 1
            raise
        self._store.delete_volume(record.name)
        with self._lock:
            self._volumes.pop(record.name, None)
            self._mounts.pop(record.name, None)
            self._mountpoints.pop(record.name, None)
            self._generation += 1

    def mount(self, name: object, mount_id: str) -> str:
        name = validate_name(name)
        deadline: float | None = None
        while True:
            try:
                return self._mount_once(name, mount_id)
            except MountPendingError as pending:
                # Stage-in may take minutes: wait for it outside the volume's lock, which
                # Unmount and Remove of the volume need meanwhile, then mount again.
                deadline = pending.deadline if deadline is None else deadline
                pending.wait(deadline)

    def _mount_once(self, name: str, mount_id: str) -> str:
        with self._volume_lock(name):
            record = self._record(name)
            backend = self._backend(record)
            first = self._active_count(name) == 0
            # Every Mount goes to the backend, not only the first: a FUSE process that died
            # under a running container is repaired by the next container's Mount.
            mountpoint = backend.mount(record)
            with self._lock:
                ids = self._mounts.setdefault(name, {})
                count = ids.get(mount_id, 0) + 1
                ids[mount_id] = count
            try:
                self._store.set_mount_count(name, mount_id, count)
            except PluginError:
                with self._lock:
                    ids[mount_id] -= 1
                    if not ids[mount_id]:
                        del ids[mount_id]
                if first:
                    backend.unmount(record)
                raise
        log.info("mounted %s id=%s count=%s at %s", name, mount_id, count, mountpoint)
        return str(mountpoint)

    def unmount(self, name: object, mount_id: str) -> None:
        name = validate_name(name)
        with self._volume_lock(name):
            with self._lock:
                record = self._volumes.get(name)
                ids = self._mounts.get(name, {})
                count = ids.get(mount_id, 0)
            if record is None or count == 0:
                # An error here makes container cleanup report "error unmounting volume";
                # unknown IDs are normal after a crash or reboot (moby#46508).
                log.info("unmount %s id=%s: not an active mount ID, nothing to do", name, mount_id)
                return
            count -= 1
            self._store.set_mount_count(name, mount_id, count)
            with self._lock:
                if count:
                    ids[mount_id] = count
                else:
                    del ids[mount_id]
                    if not ids:
                        self._mounts.pop(name, None)
            remaining = self._active_count(name)
            if remaining == 0:
                self._backend(record).unmount(record)
        log.info("unmounted %s id=%s (%s active mounts left)", name, mount_id, remaining)

    def path(self, name: object) -> str:
        record = self._record(validate_name(name))
        self._backend(record)  # a volume of a backend we lack has no path
        return self._mountpoint(record)

    def get(self, name: object) -> VolumeInfo:
        record = self._record(validate_name(name))
        return self._info(record)

    @property
    def generation(self) -> int:
        """Changes whenever List's answer may change: lets callers cache what they build from it."""
        return self._generation

    def list(self) -> list[tuple[str, str]]:
        """(name, mountpoint) of every volume; the whole registry, so kept lean."""
        with self._lock:
            records = [r for r in self._volumes.values() if not r.removing]
        return [(r.name, self._mountpoint(r)) for r in records]

    def capabilities(self) -> str:
        return SCOPE

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backends by kind (read-only): for the metrics, which find their files."""
        return MappingProxyType(self._backends)

    def _mountpoint(self, record: VolumeRecord) -> str:
        mountpoint = self._mountpoints.get(record.name)
        if mountpoint is None:
            backend = self._backends.get(record.backend)
            mountpoint = str(backend.mountpoint(record)) if backend else ""
            self._mountpoints[record.name] = mountpoint
        return mountpoint

    def _info(self, record: VolumeRecord) -> VolumeInfo:
        status: dict[str, Any] = {
            "backend": record.backend,
            "options": dict(record.options),
            "mounts": self._active_count(record.name),
            "created_at": record.created_at,
        }
        backend = self._backends.get(record.backend)
        if backend is None:
            status["error"] = f"backend {record.backend!r} is not available in this stowage"
        else:
            status.update(backend.status(record))
        return VolumeInfo(record.name, self._mountpoint(record), record.created_at, status)

    # -- restart recovery ----------------------------------------------------------------------

    def recover(self) -> None:
        """Finish interrupted Removes and re-establish mounts after a restart.

        Runs in the background after the socket is serving, so Docker's Get calls at boot are
        answered from state at once and never wait for a backend.
        """
        for backend in self._backends.values():
            try:
                backend.housekeeping()
            except Exception:
                log.exception("housekeeping of backend %s failed", backend.kind)
        self._discard_leftovers()
        with self._lock:
            records = list(self._volumes.values())
        for record in records:
            with self._volume_lock(record.name):
                try:
                    if record.removing:
                        log.info("finishing interrupted remove of %s", record.name)
                        self._finish_remove(record)
                    else:
                        mounted = self._active_count(record.name) > 0
                        self._backend(record).recover(record, mounted)
                except PluginError as exc:
                    log.warning("recovery of volume %s failed: %s", record.name, exc)
                except Exception:
                    log.exception("recovery of volume %s failed", record.name)
        log.info("recovery finished for %s volumes", len(records))

    def _discard_leftovers(self) -> None:
        """Local data directories with no record: a Create writes the record after making the
        directory, so a crash in between leaves one. The backend deletes those it can tell are
        such leftovers; each name's lock is held, so a Create running meanwhile is never hit."""
        for backend in self._backends.values():
            try:
                names = backend.leftover_names()
            except Exception:
                log.exception("listing the data directories of backend %s failed", backend.kind)
                continue
            for name in names:
                with self._volume_lock(name):
                    with self._lock:
                        record = self._volumes.get(name)
                    if record is not None and record.backend == backend.kind:
                        continue
                    try:
                        backend.discard_leftover(name)
                    except Exception:
                        log.exception("deleting the leftover data directory of %s failed", name)

    def close(self) -> None:
        for backend in self._backends.values():
            try:
                backend.close()
            except Exception:
                log.exception("closing backend %s failed", backend.kind)
        self._store.close()


def _fmt(options: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items())) or "(no options)"
