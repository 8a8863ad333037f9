"""The one way the daemon replaces a file of its own state: whole or not at all.

Temp file beside the target, fsync, rename, fsync of the directory: a crash or a full disk
leaves the old file or the new one, never half of either. Files are 0600 by default because
state and journals name buckets, hosts and volumes. This is for the daemon's own files
(state, pids, journals, records); paths beneath a volume go through plugin.confined.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace *path* with *data*.

    *durable* False skips both fsyncs: for files that only speed things up (a cache index),
    where losing the latest version on a power cut is harmless but a half-written one is not.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # an old temp file of another mode may have been reused
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
