"""The persisted description of a volume, shared by the driver core and the backends."""

from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeRecord:
    """Everything Get and List need, without touching a backend."""

    name: str
    backend: str
    options: dict[str, str]
    created_at: str
    removing: bool = False
