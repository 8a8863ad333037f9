"""Local filesystem primitives: kernel-side copies and the tree walk.

The copy ladder is the one portage and coreutils use: FICLONE (a reflink: instant, shares
extents) where the filesystem has it, then copy_file_range (no user-space buffer), then sendfile,
then plain pread/pwrite. Holes are kept by copying only the data extents (SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from plugin.confined import Tree

log = logging.getLogger(__name__)

#: linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409

#: Upper bound on one kernel copy call, so progress, bandwidth limit and cancel stay responsive.
KERNEL_COPY_STEP = 8 * 1024 * 1024

#: Largest single write of downloaded bytes. Parallel chunk workers write into one part file,
#: and a buffered write holds the file's inode lock while it copies: with 8 MiB writes, 8
#: workers and 2 vCPUs, the waiters' optimistic spinning on that lock starved the holder, and
#: 1 GiB took 2.5-9 s of system time in one run out of four (perf: copy_folio_from_iter_atomic,
#: rwsem_spin_on_owner); in 1 MiB writes it took 0.26-0.28 s every time (docs/benchmarks.md,
#: floors section).
WRITE_PIECE = 1024 * 1024

#: Files smaller than this skip the SEEK_DATA probe: sparse small files are rare, syscalls not.
SPARSE_PROBE_MIN = 1024 * 1024

#: Prefix of our temporary and journal files; the walk ignores them in a source tree.
TEMP_PREFIX = ".stowage."

_no_reflink_devs: set[int] = set()
_no_copy_file_range = False

#: Called after each kernel copy step with the number of bytes copied; may raise to stop.
StepHook = Callable[[int], None]


@dataclass(frozen=True)
class Entry:
    """One thing to copy. *rel* is posix-style relative to the tree root ('' = the root)."""

    rel: str
    kind: str  # "file" | "dir" | "symlink"
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    mode: int = 0o644
    uid: int = -1
    gid: int = -1
    target: str = ""  # symlink target
    etag: str = ""  # S3 sources only


def temp_paths(final: str) -> tuple[str, str]:
    """Deterministic part/journal names beside *final*, so a rerun finds them again."""
    head, name = os.path.split(final)
    if len(os.fsencode(name)) > 200:  # keep within NAME_MAX with prefix and suffix
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:40]
    base = os.path.join(head, TEMP_PREFIX + name)
    return base + ".part", base + ".journal"


def entry_from_stat(rel: str, st: os.stat_result, readlink: Callable[[], str]) -> Entry | None:
    """The Entry for *st*; *readlink* reads a symlink's target (through its parent's fd)."""
    if stat.S_ISREG(st.st_mode):
        kind, size, target = "file", st.st_size, ""
    elif stat.S_ISDIR(st.st_mode):
        kind, size, target = "dir", 0, ""
    elif stat.S_ISLNK(st.st_mode):
        kind, target = "symlink", readlink()
        size = len(os.fsencode(target))
    else:
        return None  # sockets, fifos, devices: not data
    return Entry(
        rel,
        kind,
        size=size,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        target=target,
    )


def walk(tree: Tree, on_skip: Callable[[str, str], None]) -> Iterator[Entry]:
    """Yield every entry beneath *tree* (directories before their contents) through its
    descriptors: links are entries, never followed, and a directory swapped for a link while
    we walk is listed as that link. Unreadable directories and special files are reported
    through *on_skip* with messages that name only paths inside the tree."""

    def unreadable(rel: str, exc: OSError) -> None:
        on_skip(rel or ".", f"cannot list directory: {exc.strerror}")

    for rel, st in tree.walk(unreadable, skip=lambda name: name.startswith(TEMP_PREFIX)):
        try:
            entry = entry_from_stat(rel, st, functools.partial(tree.readlink, rel))
        except OSError as exc:
            on_skip(rel, f"cannot read: {exc.strerror}")
            continue
        if entry is None:
            on_skip(rel, "special file (socket, fifo or device) not copied")
            continue
        yield entry


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone the whole file if the filesystem supports it (btrfs, XFS reflink=1, bcachefs)."""
    dev = os.fstat(dst_fd).st_dev
    if dev in _no_reflink_devs:
        return False
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            _no_reflink_devs.add(dev)
            return False
        raise
    return True


def data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of data extents in [start, end); holes are skipped."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end - pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def copy_range(
    src_fd: int, dst_fd: int, offset: int, length: int, step: StepHook, sparse: bool = True
) -> None:
    """Copy [offset, offset+length) to the same offsets of *dst_fd*, keeping holes if *sparse*.

    The destination must already have its final size (ftruncate), so holes read as zeros.
    """
    segments = (
        data_segments(src_fd, offset, offset + length)
        if sparse and length >= SPARSE_PROBE_MIN
        else iter([(offset, length)])
    )
    for seg_off, seg_len in segments:
        _copy_segment(src_fd, dst_fd, seg_off, seg_len, step)


def _copy_segment(src_fd: int, dst_fd: int, offset: int, length: int, step: StepHook) -> None:
    global _no_copy_file_range
    pos, end = offset, offset + length
    while pos < end:
        want = min(KERNEL_COPY_STEP, end - pos)
        n = 0
        if not _no_copy_file_range:
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _no_copy_file_range = exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP)
                n = _copy_fallback(src_fd, dst_fd, pos, want)
        else:
            n = _copy_fallback(src_fd, dst_fd, pos, want)
        if n == 0:
            raise OSError(errno.EIO, f"source shrank during copy (short read at {pos})")
        pos += n
        step(n)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of *data* at *offset*, at most `WRITE_PIECE` bytes per call. A short write
    is how a filling disk first shows; the next call raises ENOSPC."""
    pos = 0
    while pos < len(data):
        n = os.pwrite(fd, data[pos : pos + WRITE_PIECE], offset + pos)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"wrote nothing at byte {offset + pos} (disk full?)")
        pos += n


def _copy_fallback(src_fd: int, dst_fd: int, pos: int, want: int) -> int:
    """pread/pwrite with a 256 KiB buffer (measured far faster than 1 MiB buffers)."""
    data = os.pread(src_fd, min(want, 256 * 1024), pos)
    view = memoryview(data)
    while view:
        # A short write is how a filling disk first shows (the next call raises ENOSPC);
        # counting the bytes read instead left a torn file under its final name.
        n = os.pwrite(dst_fd, view, pos + len(data) - len(view))
        view = view[n:]
    return len(data)
