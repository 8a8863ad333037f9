"""Domain errors. Their messages are shown to users verbatim by `docker ...`, so they must say
what went wrong and what to do about it. Translation to `{"Err": ...}` happens only in plugin.api.
"""

from collections.abc import Callable


class PluginError(Exception):
    """Base class: a failure whose message is safe and useful to show to the user."""


class InvalidRequestError(PluginError):
    """The request itself is malformed (bad JSON, missing field)."""


class InvalidNameError(PluginError):
    """A volume name that cannot be stored safely."""


class InvalidOptionError(PluginError):
    """An unknown option, or a known option with a bad value."""


class VolumeNotFoundError(PluginError):
    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} not found")
        self.name = name


class VolumeConflictError(PluginError):
    """Create of an existing name with different options."""


class MountError(PluginError):
    """The backend could not make the volume available."""


class BackendError(PluginError):
    """The backend failed an operation other than mounting."""


class StateError(PluginError):
    """The durable state store cannot be read or written."""


class MountPendingError(MountError):
    """A Mount that must wait (for stage-in) before it can succeed. Raised instead of waiting,
    because the caller holds the volume's lock, which Unmount and Remove of the volume need
    meanwhile: the caller releases its lock, calls `wait(deadline)` (returns once the volume
    is ready, raises MountError when it failed or `deadline` passed) and mounts again.
    `deadline` (time.monotonic()) is when this Mount should give up."""

    def __init__(self, message: str, wait: Callable[[float], None], deadline: float) -> None:
        super().__init__(message)
        self.wait = wait
        self.deadline = deadline
