"""The contract between the driver core and a kind of volume storage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugin.options import OptionSpec
from plugin.records import VolumeRecord


class Backend(ABC):
    """One kind of volume. The driver serialises calls per volume and keeps refcounts; a backend
    only makes data available (mount) and releases it (unmount). Errors are PluginErrors."""

    kind: ClassVar[str]
    option_specs: ClassVar[Mapping[str, OptionSpec]]
    #: Options of a feature layered on the backend (local volumes: staging); Create accepts
    #: both tables.
    extra_option_specs: ClassVar[Mapping[str, OptionSpec]] = {}

    def __init__(self, root: Path) -> None:
        self.root = root

    def validate(self, name: str, options: Mapping[str, str]) -> None:
        """Checks beyond the option table (paths allowed, bucket reachable). Default: none."""

    def with_defaults(self, options: Mapping[str, str]) -> dict[str, str]:
        """The options with the daemon's defaults (e.g. --s3-endpoint) filled in where they
        apply; stored with the volume. Default: unchanged."""
        return dict(options)

    def canonical_options(self, options: Mapping[str, str]) -> dict[str, str]:
        """The options as they are stored, e.g. with host paths resolved. Default: unchanged."""
        return dict(options)

    @abstractmethod
    def create(self, record: VolumeRecord) -> None:
        """Make the volume exist. Must be idempotent: a crash may repeat it."""

    @abstractmethod
    def mountpoint(self, record: VolumeRecord) -> Path:
        """The path Docker gets from Mount, Path, Get and List; stable for the volume's life."""

    @abstractmethod
    def mount(self, record: VolumeRecord) -> Path:
        """Make the data available at mountpoint(record) and return it. Called on every
        Mount: must be idempotent, cheap when already mounted, and repair a dead mount."""

    @abstractmethod
    def unmount(self, record: VolumeRecord) -> None:
        """Called when the last mount ID lets go, and before Remove of a still-mounted volume."""

    @abstractmethod
    def remove(self, record: VolumeRecord) -> None:
        """Delete what the volume owns. Must be idempotent: a crash may repeat it."""

    def status(self, record: VolumeRecord) -> dict[str, Any]:
        """Extra fields for `docker volume inspect` Status. Must be fast: no network."""
        return {}

    def recover(self, record: VolumeRecord, mounted: bool) -> None:
        """After a daemon restart: re-establish (mounted) or clean up (not mounted) the volume."""

    def housekeeping(self) -> None:
        """After a daemon restart, once: backend-wide cleanup such as emptying trash."""

    def close(self) -> None:
        """The driver is closing: release helpers (processes, sockets); volumes stay."""

    def leftover_names(self) -> list[str]:
        """Names whose data a Create interrupted before its record was written (the driver
        then calls `discard_leftover` for each it has no record of, under the name's lock)."""
        return []

    def discard_leftover(self, name: str) -> bool:
        """Delete such a leftover if it is one (empty); True if it was deleted."""
        return False
