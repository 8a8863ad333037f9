"""Kernel mount helpers: bind mounts and mount-table lookups, without shelling out.

`os.path.ismount` cannot see a bind mount of a directory from the same filesystem (same st_dev),
so mountpoints are looked up in /proc/self/mountinfo instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mountpoints() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {_unescape(line.split()[4]) for line in f if line.strip()}


def is_mountpoint(path: Path) -> bool:
    return os.path.realpath(path) in mountpoints()


def _check(ret: int, what: str, path: Path) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def bind_mount(source: Path, target: Path, readonly: bool) -> None:
    """Bind `source` at `target`; a read-only bind needs a second remount call on Linux."""
    _check(_libc.mount(bytes(source), bytes(target), None, MS_BIND, None), "bind mount", target)
    if readonly:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        ret = _libc.mount(None, bytes(target), None, flags, None)
        if ret != 0:
            err = ctypes.get_errno()
            _libc.umount2(bytes(target), MNT_DETACH)
            raise OSError(err, f"read-only remount {target}: {os.strerror(err)}")


def lazy_unmount(target: Path) -> None:
    """Detach `target` (MNT_DETACH): never blocks on a busy or dead (ENOTCONN) mount."""
    ret = _libc.umount2(bytes(target), MNT_DETACH)
    if ret != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            return
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
