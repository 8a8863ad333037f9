"""The host-wide stage-in cache (`--stage-cache DIR`): verified objects kept once per host.

Why: many containers, each with its own staged volume, often need the same large model or
dataset. Without a cache every volume downloads its own copy; with it, the first volume's
verified download is kept here and the later volumes get a clone: a reflink (FICLONE, XFS and
btrfs: no bytes copied, extents shared) when the cache and the volume share a filesystem
that has them, else copy_file_range, else read/write.

Layout: one regular file per object version, named by hashes of (endpoint, bucket, key) and
(ETag, size), so a changed object is another entry and the older versions of a key are found
by name and dropped when a new one is admitted. An entry is written under a temporary name,
fsynced and renamed into place only when complete, so neither a crash nor a power cut leaves
a servable half (or zero-filled) entry; temporary names left by a crash are removed at start.
The engine admits only bytes it verified against the store's checksum, and `fill` serves an
entry only if its size is the object's, so the cache never serves bytes nobody checked.

Recency: a fill touches the entry's mtime (one syscall on a descriptor already open) rather
than rewriting an index file. The order lives with the entries themselves, survives a restart
(the start-up scan sorts by mtime) and cannot disagree with the directory after a crash;
atime is no substitute, since relatime and noatime hosts do not keep it. In memory an ordered
dict holds the same order, so eviction never scans the directory.

The cache directory belongs to the daemon (root, 0700, entries 0600) and lives outside every
volume; it is reached through one directory descriptor. Volumes are never opened here: the
engine passes descriptors it opened through plugin.confined.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from plugin.options import parse_size
from plugin.staging import localfs
from plugin.staging.errors import StagingError
from plugin.staging.objcache import ObjectIdentity
from plugin.units import format_bytes

log = logging.getLogger(__name__)

#: Temporary names of entries being admitted; removed at start (a crash left them).
TEMP_PREFIX = ".admit-"
#: A cache smaller than this could not hold anything worth staging twice.
MIN_CACHE_BYTES = 1 << 20
_ENTRY_RE = re.compile(r"^([0-9a-f]{40})-([0-9a-f]{24})$")
#: (source device, destination device) pairs where FICLONE failed: not tried again.
_no_reflink_pairs: set[tuple[int, int]] = set()
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)


class StageCacheError(StagingError):
    """The cache directory cannot be used (wrong owner, not a directory, ...)."""


def entry_name(ident: ObjectIdentity) -> str:
    """The file name of *ident*'s entry: its key's hash, then its version's hash."""
    return f"{_key_hash(ident)}-{_version_hash(ident)}"


def _key_hash(ident: ObjectIdentity) -> str:
    raw = "\0".join((ident.endpoint, ident.bucket, ident.key))
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _version_hash(ident: ObjectIdentity) -> str:
    raw = f"{ident.etag}\0{ident.size}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _reflink(src_fd: int, dst_fd: int) -> bool:
    """FICLONE *src_fd* over *dst_fd*; False where the pair of filesystems cannot.

    Remembered per (source, destination) device pair, not per destination as
    localfs.try_reflink does: a cache on another filesystem than a volume must not switch
    reflinks off for the volume's own local copies.
    """
    pair = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    if pair in _no_reflink_pairs:
        return False
    try:
        fcntl.ioctl(dst_fd, localfs.FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            _no_reflink_pairs.add(pair)
            return False
        raise
    return True


def _no_progress(_n: int) -> None:
    """copy_range's step hook: cache copies report no progress of their own."""


def clone_into(src_fd: int, dst_fd: int, size: int) -> str:
    """Make *dst_fd* (empty) hold the first *size* bytes of *src_fd*; returns how:
    "reflink", or "copy" (copy_file_range looped until done, or read/write; holes kept)."""
    if size and _reflink(src_fd, dst_fd):
        return "reflink"
    os.ftruncate(dst_fd, size)
    localfs.copy_range(src_fd, dst_fd, 0, size, _no_progress)
    return "copy"


class StageCache:
    """An LRU cache of verified objects bounded to *max_bytes*; the engine's ObjectCache.

    Thread-safe: bookkeeping under one lock, copies outside it. Two volumes staging the same
    object at once admit it once (the second admit is a no-op).
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes < MIN_CACHE_BYTES:
            raise StageCacheError(
                f"stage cache size {max_bytes} bytes: give at least {format_bytes(MIN_CACHE_BYTES)}"
            )
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        #: Entry name -> size, least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        #: Entries being admitted -> bytes reserved for them.
        self._pending: dict[str, int] = {}
        self._used = 0
        self._warned = False
        self._counters = dict.fromkeys(
            (
                "hits",
                "misses",
                "bytes_served",
                "bytes_reflinked",
                "admitted",
                "bytes_admitted",
                "evictions",
                "replaced",
            ),
            0,
        )
        self._dir_fd = self._open_directory()
        self._scan()

    # -- the ObjectCache protocol -------------------------------------------------------------

    def fill(self, ident: ObjectIdentity, dst_fd: int) -> bool:
        """Clone *ident*'s entry into *dst_fd*; False (dst left empty) on a miss or any error."""
        name = entry_name(ident)
        with self._lock:
            known = name in self._entries
            if known:
                self._entries.move_to_end(name)
        if not known:
            return self._miss()
        try:
            src = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dir_fd)
        except FileNotFoundError:  # evicted or removed since
            self._forget(name)
            return self._miss()
        except OSError as exc:
            self._warn_once("cannot read the stage cache %s: %s", self.directory, exc)
            return self._miss()
        try:
            size = os.fstat(src).st_size
            if size != ident.size:
                log.warning(
                    "stage cache entry %s is %d bytes, not the object's %d: dropped",
                    name,
                    size,
                    ident.size,
                )
                self._drop(name)
                return self._miss()
            how = clone_into(src, dst_fd, size)
            os.utime(src)  # the recency a restart reads back
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(dst_fd, 0)
            self._warn_once("cannot serve from the stage cache %s: %s", self.directory, exc)
            return self._miss()
        finally:
            os.close(src)
        with self._lock:
            self._counters["hits"] += 1
            self._counters["bytes_served"] += size
            if how == "reflink":
                self._counters["bytes_reflinked"] += size
        return True

    def admit(self, ident: ObjectIdentity, src_fd: int) -> None:
        """Keep a copy of *src_fd* (verified by the engine) as *ident*'s entry. Never raises:
        the download it came from succeeded whether or not the cache could keep it."""
        try:
            self._admit(ident, src_fd)
        except Exception as exc:  # a full or broken cache must not fail the copy
            self._warn_once("cannot add to the stage cache %s: %s", self.directory, exc)

    # -- Status ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since start, plus what the cache holds now (for Status)."""
        with self._lock:
            return {
                **self._counters,
                "entries": len(self._entries),
                "bytes_cached": self._used,
                "max_bytes": self.max_bytes,
            }

    def close(self) -> None:
        os.close(self._dir_fd)

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, ident: ObjectIdentity, src_fd: int) -> None:
        if ident.size > self.max_bytes:
            log.debug("not caching %s (%d bytes): larger than the cache", ident.key, ident.size)
            return
        actual = os.fstat(src_fd).st_size
        if actual != ident.size:
            log.warning(
                "not caching %s: file is %d bytes, object %d", ident.key, actual, ident.size
            )
            return
        name = entry_name(ident)
        with self._lock:
            if name in self._entries or name in self._pending:
                return
            if not self._make_room(ident.size):
                log.debug("not caching %s: the cache is full of admits in flight", ident.key)
                return
            self._pending[name] = ident.size
        try:
            self._write_entry(name, src_fd, ident.size)
        except BaseException:
            with self._lock:
                del self._pending[name]
            raise
        with self._lock:  # one critical section: no admit of the same name slips in between
            del self._pending[name]
            self._entries[name] = ident.size
            self._used += ident.size
            self._counters["admitted"] += 1
            self._counters["bytes_admitted"] += ident.size
            prefix = name.partition("-")[0] + "-"
            for other in [n for n in self._entries if n.startswith(prefix) and n != name]:
                self._unlink_locked(other)
                self._counters["replaced"] += 1
            self._make_room(0)

    def _write_entry(self, name: str, src_fd: int, size: int) -> None:
        """Copy into a temporary name, fsync, rename: complete and durable, or absent."""
        tmp = f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600, dir_fd=self._dir_fd)
        try:
            os.fchmod(fd, 0o600)
            clone_into(src_fd, fd, size)
            written = os.fstat(fd).st_size
            if written != size:
                raise OSError(errno.EIO, f"entry is {written} bytes after copying, not {size}")
            # A power cut after the rename must not leave zeros under a servable name.
            os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir_fd)
            raise
        finally:
            os.close(fd)

    def _make_room(self, need: int) -> bool:
        """Evict least recently used entries until *need* more bytes fit (lock held)."""
        reserved = sum(self._pending.values())
        while self._entries and self._used + reserved + need > self.max_bytes:
            oldest = next(iter(self._entries))
            self._unlink_locked(oldest)
            self._counters["evictions"] += 1
        return self._used + reserved + need <= self.max_bytes

    def _unlink_locked(self, name: str) -> None:
        self._used -= self._entries.pop(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir_fd)

    def _drop(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                self._unlink_locked(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._used -= self._entries.pop(name, 0)

    def _miss(self) -> bool:
        with self._lock:
            self._counters["misses"] += 1
        return False

    def _warn_once(self, message: str, *args: object) -> None:
        """The first failure as a warning, the rest at debug: one broken cache, one line."""
        with self._lock:
            first, self._warned = not self._warned, True
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def _open_directory(self) -> int:
        """The cache directory's descriptor: created 0700, ours, never through a symlink."""
        where = self.directory
        try:
            where.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise StageCacheError(
                f"stage cache {where}: cannot use it as a directory ({exc.strerror}); "
                "give --stage-cache a directory the daemon owns"
            ) from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise StageCacheError(
                f"stage cache {where} belongs to uid {st.st_uid}, not the daemon's "
                f"{os.geteuid()}: whoever owns it could plant bytes in volumes; "
                "give --stage-cache a directory of its own"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
        return fd

    def _scan(self) -> None:
        """Rebuild the LRU order from the entries' mtimes; remove what a crash left."""
        found: list[tuple[int, str, int]] = []
        for name in os.listdir(self._dir_fd):
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if name.startswith(TEMP_PREFIX):
                    os.unlink(name, dir_fd=self._dir_fd)
                elif (
                    _ENTRY_RE.match(name) and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                ):
                    found.append((st.st_mtime_ns, name, st.st_size))
                else:
                    log.warning("stage cache %s: ignoring unexpected %r", self.directory, name)
            except OSError as exc:
                log.warning("stage cache %s: cannot check %r: %s", self.directory, name, exc)
        for _, name, size in sorted(found):
            self._entries[name] = size
            self._used += size
        with self._lock:
            self._make_room(0)
        log.info(
            "stage cache %s: %d entries, %s of %s",
            self.directory,
            len(self._entries),
            format_bytes(self._used),
            format_bytes(self.max_bytes),
        )


def parse_stage_cache(value_dir: str, size: str) -> tuple[Path, int]:
    """The daemon's `--stage-cache DIR` and `--stage-cache-size SIZE`, checked; ValueError
    with a message naming the flag otherwise."""
    if not value_dir or "\0" in value_dir:
        raise ValueError("--stage-cache: give the cache's directory, e.g. /var/cache/stowage")
    if not os.path.isabs(value_dir):
        raise ValueError(f"--stage-cache {value_dir!r}: give an absolute path")
    try:
        limit = parse_size(size)
    except (ValueError, OverflowError):  # OverflowError: digits beyond a float's range
        raise ValueError(
            f"--stage-cache-size {size!r}: expected a size such as 512M or 20G"
        ) from None
    if limit < MIN_CACHE_BYTES:
        raise ValueError(
            f"--stage-cache-size {size!r}: give at least {format_bytes(MIN_CACHE_BYTES)}"
        )
    return Path(os.path.normpath(value_dir)), limit
