"""Leases: a staged volume that stages in from and out to the same prefix is held by one host
at a time, so no host serves data older than what another host is still uploading.

A lease object names its holder and when it expires. The holder renews it (every third of the
TTL) while the volume is mounted there or its stage-out has work, and releases it once the
upload is done. Another host's Mount waits for the release (outside the volume's lock:
MountPendingError), then stages in the latest data. A holder that died stops renewing: after
the expiry another host takes over, and Status says what may be missing (whatever the dead
host had not uploaded). Expiry compares wall clocks: hosts must keep them in sync (NTP); a
skew shortens or lengthens the wait by as much.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from plugin.errors import MountError, MountPendingError
from plugin.records import VolumeRecord
from plugin.registry.store import RegistryStore, RegistryUnavailableError

log = logging.getLogger(__name__)

#: How often a waiting Mount asks whether the lease is free.
POLL_S = 0.5


def needs_lease(record: VolumeRecord) -> bool:
    """Staged both ways on one location: the remote copy is the volume, one writer at a time."""
    opts = record.options
    if record.backend != "local":
        return False
    stage_in, stage_out = opts.get("stage_in", ""), opts.get("stage_out", "")
    return bool(stage_in and stage_out) and stage_in.rstrip("/") == stage_out.rstrip("/")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Acquired:
    #: Who held it before us (None: nobody ever did, or we did).
    previous: str | None
    #: True when the previous holder's lease expired instead of being released.
    taken_over: bool
    expired_at: float | None = None


@dataclass(eq=False)
class LeaseManager:
    """This host's leases: acquire at Mount, renew while busy, release when idle."""

    store: RegistryStore
    host: str
    ttl: float
    handover_state: Callable[[str], str]
    #: Called when the lease comes from another host: this host's copy may be stale.
    on_handover: Callable[[str], None]
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    #: name -> ETag of our lease object, for every lease this host holds.
    _held: dict[str, str] = field(default_factory=dict, init=False)
    #: name -> what Status shows about the lease (holder, expiry, a takeover note).
    _notes: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    # -- acquiring ----------------------------------------------------------------------------

    def acquire(self, record: VolumeRecord, timeout: float) -> Acquired | None:
        """Take the lease now, or raise MountPendingError whose wait polls until it is free
        (MountError when `timeout` passes). None: this host already held it."""
        name = record.name
        with self._lock:
            held = name in self._held
        if held:
            return None
        result = self._try(name)
        if isinstance(result, Acquired):
            return result

        def wait(deadline: float) -> None:
            while time.monotonic() < deadline:
                if isinstance(self._try(name), Acquired):
                    return
                time.sleep(POLL_S)
            raise MountError(self._busy_message(name))

        raise MountPendingError(
            self._busy_message(name), wait, time.monotonic() + max(1.0, timeout)
        )

    def _busy_message(self, name: str) -> str:
        note = self._notes.get(name, {})
        holder = note.get("holder", "another host")
        state = note.get("holder_state", "busy")
        return (
            f"volume {name!r} is held by host {holder} ({state}; lease until "
            f"{note.get('expires', '?')}): a staged volume is used by one host at a time, and "
            "this host waits until that host has uploaded its changes (stage-out) and released "
            "it, or until its lease expires. Try again later; `docker volume inspect` on that "
            "host shows its stage-out progress"
        )

    def _try(self, name: str) -> Acquired | str:
        """Acquired, or the holder's id. Registry trouble counts as busy (we cannot know)."""
        try:
            current = self.store.get_lease(name)
            now = time.time()
            doc = self._doc(name, "mounted")
            if current is None:
                ok = self.store.write_lease(name, doc, None)
                previous: str | None = None
                taken_over, expired_at = False, None
            else:
                holder = current.doc.get("holder")
                expires = float(current.doc.get("expires", 0))
                if holder and holder != self.host and expires > now:
                    self._notes[name] = {
                        "holder": holder,
                        "holder_state": current.doc.get("state", "busy"),
                        "expires": _iso(expires),
                    }
                    return str(holder)
                taken_over = bool(holder) and holder != self.host
                expired_at = expires if taken_over else None
                previous = holder or current.doc.get("last_holder")
                ok = self.store.write_lease(name, doc, current.etag)
            if not ok:
                return "another host"
            stored = self.store.get_lease(name)
            if stored is None or stored.doc.get("nonce") != doc["nonce"]:
                return "another host"
        except RegistryUnavailableError as exc:
            self._notes[name] = {"holder": "unknown", "holder_state": str(exc), "expires": "?"}
            return "unknown"
        with self._lock:
            self._held[name] = stored.etag
        note: dict[str, Any] = {"holder": self.host, "expires": _iso(float(doc["expires"]))}
        if taken_over:
            note["takeover"] = (
                f"took over from host {previous}, whose lease expired at "
                f"{_iso(expired_at or 0)} without a release: changes made there after its last "
                "completed stage-out may be missing"
            )
            log.warning("lease of %s: %s", name, note["takeover"])
        self._notes[name] = note
        if previous and previous != self.host:
            self.on_handover(name)
        return Acquired(None if previous == self.host else previous, taken_over, expired_at)

    def _doc(self, name: str, state: str) -> dict[str, Any]:
        import secrets

        return {
            "volume": name,
            "holder": self.host,
            "state": state,
            "expires": time.time() + self.ttl,
            "renewed_at": _iso(time.time()),
            "nonce": secrets.token_hex(8),
        }

    # -- renewing and releasing ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="registry-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(min(self.ttl / 3, 2.0)):
            with self._lock:
                names = list(self._held)
            for name in names:
                try:
                    self.tend(name)
                except RegistryUnavailableError as exc:
                    log.warning("lease of %s: cannot renew (%s); retrying", name, exc)
                except Exception:
                    log.exception("lease of %s: renewal failed", name)

    def tend(self, name: str) -> None:
        """Renew while busy (or while stage-out failed: the data exists only here), release
        once idle."""
        state = self.handover_state(name)
        with self._lock:
            etag = self._held.get(name)
        if etag is None:
            return
        if state == "idle":
            self.release(name)
            return
        doc = self._doc(name, "staging out or mounted" if state == "busy" else "stage-out failed")
        if not self.store.write_lease(name, doc, etag):
            log.warning("lease of %s was taken by another host while held here", name)
            with self._lock:
                self._held.pop(name, None)
            return
        stored = self.store.get_lease(name)
        with self._lock:
            if stored is not None:
                self._held[name] = stored.etag
        self._notes.setdefault(name, {})["expires"] = _iso(float(doc["expires"]))

    def release(self, name: str) -> None:
        with self._lock:
            etag = self._held.pop(name, None)
        if etag is None:
            return
        doc = {"holder": None, "last_holder": self.host, "released_at": _iso(time.time())}
        if self.store.write_lease(name, {**doc, "expires": 0}, etag):
            log.info("lease of %s released", name)
        self._notes[name] = {"holder": None, "last_holder": self.host}

    def forget(self, name: str) -> None:
        """The volume is gone: drop the lease object if it is ours."""
        with self._lock:
            held = self._held.pop(name, None) is not None
        self._notes.pop(name, None)
        if held:
            self.store.delete_lease(name)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self._notes.get(name, {}))
