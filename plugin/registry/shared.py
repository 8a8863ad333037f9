"""The volume driver of a host that shares its volumes with others through the registry.

Each host keeps its SQLite state as a cache of the registry, so Get and List stay in memory and
keep answering while S3 is unreachable; a sync thread LISTs the registry (every POLL_S) and
adopts volumes created elsewhere, and forgets volumes removed elsewhere, within about a second.

Which volumes can be shared: those whose data is reachable from every host: S3 volumes, and
local volumes staged from or to S3. A plain local volume (its data in one host's directory) is
refused in registry mode: Scope global tells Swarm it may run the task on any node, where the
data would not be (docs/several-hosts.md).

Volumes this host knew before the registry was configured stay local (not published): the
sync only forgets names it learned from the registry or published to it, kept in
`<root>/registry.json` with the removals still to publish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plugin.atomic import write_atomically
from plugin.backends.base import Backend
from plugin.backends.staged.options import parse_stage_timeout as parse_timeout
from plugin.driver.driver import VolumeDriver, VolumeInfo
from plugin.driver.state import StateStore
from plugin.errors import BackendError, InvalidOptionError, PluginError, VolumeConflictError
from plugin.names import validate_name
from plugin.options import split_backend
from plugin.records import VolumeRecord
from plugin.registry.lease import LeaseManager, needs_lease
from plugin.registry.store import RegistryStore, RegistryUnavailableError

log = logging.getLogger(__name__)

SCOPE = "global"
#: Interval of the registry LIST: a change on one host shows on the others within about this.
POLL_S = 0.5
KNOWN_FILE = "registry.json"


def shareable(kind: str, options: Mapping[str, str]) -> bool:
    if kind != "local":
        return True
    urls = (options.get("stage_in", ""), options.get("stage_out", ""))
    return any(url.lower().startswith("s3://") for url in urls)


def _record(doc: Mapping[str, Any]) -> VolumeRecord:
    options = doc.get("options")
    return VolumeRecord(
        name=str(doc["name"]),
        backend=str(doc["backend"]),
        options={str(k): str(v) for k, v in (options or {}).items()},
        created_at=str(doc["created_at"]),
    )


def _keep_remote_data(record: VolumeRecord) -> VolumeRecord:
    """The record as a host that did not run `docker volume rm` removes it: its own copy and
    cache only. The host that ran it deleted remote data already if asked to (remove_data)."""
    options = {k: v for k, v in record.options.items() if k != "remove_data"}
    return dataclasses.replace(record, options=options)


class SharedVolumeDriver(VolumeDriver):
    def __init__(
        self,
        store: StateStore,
        backends: Mapping[str, Backend],
        registry: RegistryStore,
        host: str,
        root: Path,
        lease_ttl: float,
    ) -> None:
        super().__init__(store, backends)
        self.registry = registry
        self.host = host
        self._known_path = root / KNOWN_FILE
        self._known, self._forget = self._load_known()
        self._etags: dict[str, str] = {}
        self._origins: dict[str, str] = {}
        self._mounting: dict[str, int] = {}
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.leases = LeaseManager(
            registry, host, lease_ttl, self._handover_state, self._stale_here
        )
        log.info("registry %s, this host is %s", registry.url, host)

    # -- what the registry remembers locally ----------------------------------------------------

    def _load_known(self) -> tuple[set[str], set[str]]:
        try:
            raw = json.loads(self._known_path.read_text())
            return set(raw.get("known", [])), set(raw.get("forget", []))
        except FileNotFoundError:
            return set(), set()
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s (%s); starting afresh", self._known_path, exc)
            return set(), set()

    def _save_known(self) -> None:
        with self._lock:
            payload = {"known": sorted(self._known), "forget": sorted(self._forget)}
        try:
            write_atomically(self._known_path, json.dumps(payload).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", self._known_path, exc)

    # -- protocol operations --------------------------------------------------------------------

    def capabilities(self) -> str:
        return SCOPE

    def create(self, name: object, raw_options: Mapping[str, str] | None) -> None:
        name = validate_name(name)
        kind, options = split_backend(raw_options, list(self._backends))
        if not shareable(kind, options):
            raise InvalidOptionError(
                f"volume {name!r}: this stowage shares its volumes with other hosts (--registry "
                f"{self.registry.url}), and a plain local volume's data would exist on this host "
                "only. Use -o backend=s3, or a staged volume (-o stage_in=s3://... and/or "
                "-o stage_out=s3://...); see docs/several-hosts.md"
            )
        with self._lock:
            existing = self._volumes.get(name)
        existed = existing is not None and not existing.removing
        super().create(name, raw_options)
        if existed:
            return
        with self._lock:
            record = self._volumes[name]
        doc = {**dataclasses.asdict(record), "host": self.host, "nonce": secrets.token_hex(8)}
        doc.pop("removing", None)
        try:
            stored = self.registry.create_volume(name, doc)
        except RegistryUnavailableError as exc:
            self._drop_local(record)
            raise BackendError(
                f"cannot create volume {name!r}: the registry is unreachable, so no other host "
                f"could know it ({exc}); try again when it answers"
            ) from exc
        winner = _record(stored.doc)
        if stored.doc.get("nonce") != doc["nonce"]:
            if (winner.backend, winner.options) != (record.backend, record.options):
                self._drop_local(record)
                raise VolumeConflictError(
                    f"volume {name!r} already exists, created on host "
                    f"{stored.doc.get('host', '?')} with different options "
                    f"(backend={winner.backend}, {_fmt(winner.options)}); remove it first to "
                    "recreate it with new options"
                )
            log.info("create %s: host %s created it at the same time", name, stored.doc.get("host"))
        with self._lock:
            self._known.add(name)
            self._etags[name] = stored.etag
            self._origins[name] = str(stored.doc.get("host", ""))
        self._save_known()

    def remove(self, name: object) -> None:
        name = validate_name(name)
        with self._lock:
            shared = name in self._known
        super().remove(name)
        if not shared:
            return
        with self._lock:
            self._known.discard(name)
            self._forget.add(name)
        self._save_known()
        try:
            self.leases.forget(name)
        except RegistryUnavailableError as exc:
            log.warning("remove %s: lease not deleted (%s)", name, exc)
        self._publish_removals()

    def _mount_once(self, name: str, mount_id: str) -> str:
        record = self._record(name)
        if not needs_lease(record):
            return super()._mount_once(name, mount_id)
        with self._lock:
            self._mounting[name] = self._mounting.get(name, 0) + 1
        try:
            timeout = record.options.get("stage_timeout")
            self.leases.acquire(record, parse_timeout(timeout) if timeout else 60.0)
            return super()._mount_once(name, mount_id)
        finally:
            with self._lock:
                self._mounting[name] -= 1
                if not self._mounting[name]:
                    del self._mounting[name]

    def _info(self, record: VolumeRecord) -> VolumeInfo:
        info = super()._info(record)
        registry: dict[str, Any] = {"url": self.registry.url, "this_host": self.host}
        with self._lock:
            if record.name in self._known:
                registry["created_on"] = self._origins.get(record.name, "unknown yet")
            else:
                registry["shared"] = False
        if needs_lease(record):
            registry["lease"] = self.leases.status(record.name)
        info.status["registry"] = registry
        return info

    # -- leases ---------------------------------------------------------------------------------

    def _handover_state(self, name: str) -> str:
        with self._lock:
            mounting = name in self._mounting
        if mounting or self._active_count(name):
            return "busy"
        stager = getattr(self._backends.get("local"), "stager", None)
        return str(stager.handover_state(name)) if stager is not None else "idle"

    def _stale_here(self, name: str) -> None:
        """Another host held the volume since this one: stage in again at this Mount."""
        local = self._backends.get("local")
        with self._lock:
            record = self._volumes.get(name)
        if local is None or record is None:
            return
        stager = getattr(local, "stager", None)
        if stager is not None:
            stager.force_stage_in(record, local.data_path(record), local._volume_dir(record))  # type: ignore[attr-defined]

    # -- sync -----------------------------------------------------------------------------------

    def recover(self) -> None:
        self._sync_thread = threading.Thread(
            target=self._sync_loop, name="registry-sync", daemon=True
        )
        self._sync_thread.start()
        self.leases.start()
        super().recover()

    def close(self) -> None:
        self._stop.set()
        self.leases.stop()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=5)
        super().close()

    def _sync_loop(self) -> None:
        failing = False
        while True:
            try:
                self.sync_once()
            except RegistryUnavailableError as exc:
                if not failing:
                    log.warning("registry sync failing (answering from the local cache): %s", exc)
                failing = True
            except Exception:
                log.exception("registry sync failed")
            else:
                if failing:
                    log.info("registry sync works again")
                failing = False
            if self._stop.wait(POLL_S):
                return

    def sync_once(self) -> None:
        self._publish_removals()
        with self._lock:
            known_before = set(self._known)
            forget = set(self._forget)
        remote = self.registry.list_volumes()
        for name, etag in remote.items():
            if name in forget or self._etags.get(name) == etag:
                continue
            stored = self.registry.get_volume(name)
            if stored is None:
                continue
            try:
                record = _record(stored.doc)
                validate_name(record.name)
            except (KeyError, TypeError, PluginError) as exc:
                log.warning("registry record of %r is unusable (%s); ignored", name, exc)
                self._etags[name] = etag
                continue
            if self._adopt(record, str(stored.doc.get("host", ""))):
                self._etags[name] = etag
        for name in sorted(known_before - remote.keys() - forget):
            self._forget_remote(name)

    def _publish_removals(self) -> None:
        with self._lock:
            pending = sorted(self._forget)
        for name in pending:
            self.registry.delete_volume(name)
            with self._lock:
                self._forget.discard(name)
                self._etags.pop(name, None)
        if pending:
            self._save_known()

    def _adopt(self, record: VolumeRecord, origin: str) -> bool:
        """Take a record from the registry into the local cache; False to try again later."""
        name = record.name
        with self._volume_lock(name):
            with self._lock:
                existing = self._volumes.get(name)
                known = name in self._known
                self._origins[name] = origin
            if existing is not None:
                same = (existing.backend, existing.options) == (record.backend, record.options)
                if same:
                    if not known:
                        with self._lock:
                            self._known.add(name)
                        self._save_known()
                    return True
                if not known or self._active_count(name) or existing.removing:
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning(
                            "registry has volume %s with other options than this host's; "
                            "keeping this host's until it is removed here",
                            name,
                        )
                    return False
                self._drop_local(existing, locked=True)
            backend = self._backends.get(record.backend)
            if backend is None:
                return False
            backend.create(record)
            self._store.add_volume(record)
            with self._lock:
                self._volumes[name] = record
                self._mountpoints.pop(name, None)
                self._known.add(name)
                self._generation += 1
        self._save_known()
        log.info("adopted volume %s from the registry (created on %s)", name, origin or "?")
        return True

    def _forget_remote(self, name: str) -> None:
        """Removed on another host: drop this host's copy (never the remote data)."""
        with self._volume_lock(name):
            with self._lock:
                record = self._volumes.get(name)
            if record is not None and self._active_count(name):
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("volume %s was removed on another host but is mounted here", name)
                return
            if record is not None:
                try:
                    self._drop_local(record, locked=True)
                except PluginError as exc:
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning("volume %s removed elsewhere; kept here: %s", name, exc)
                    return
            with self._lock:
                self._known.discard(name)
                self._etags.pop(name, None)
                self._warned.discard(name)
        self._save_known()
        log.info("forgot volume %s: removed on another host", name)

    def _drop_local(self, record: VolumeRecord, locked: bool = False) -> None:
        """Delete this host's copy of a volume (a lost Create race, a remote Remove)."""
        if not locked:
            with self._volume_lock(record.name):
                self._drop_local(record, locked=True)
            return
        self._store.mark_removing(record.name)
        with self._lock:
            self._volumes[record.name] = dataclasses.replace(record, removing=True)
            self._generation += 1
        self._finish_remove(_keep_remote_data(record))


def _fmt(options: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items())) or "(no options)"
