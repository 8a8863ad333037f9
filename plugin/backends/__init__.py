"""Volume backends, by the name users give in `-o backend=`."""

from plugin.backends.base import Backend
from plugin.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend"]
