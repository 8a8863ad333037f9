"""Confined file access: the one way stowage touches anything beneath a volume or an allowed
host path.

Everything beneath a volume is written by someone we do not trust (a container, a bucket
writer, an archive author), and they can swap a directory for a symlink while we work. So no
path beneath a `Tree`'s root is ever resolved as a string by the kernel's ordinary lookup:

- the root is opened once, as a directory descriptor;
- every other name is reached from that descriptor with `openat2(2)` and
  `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` (Linux 5.6+), or, where the
  kernel lacks it, one component at a time with `O_NOFOLLOW | O_DIRECTORY` and `dir_fd`;
- the last component is acted on relative to its parent's descriptor and never followed
  (`O_NOFOLLOW`, `follow_symlinks=False`, `unlink`/`rename` act on the link itself).

A symlink beneath the root is therefore data, never a way out: it is copied, listed, replaced
or deleted as a link. A walk sees a directory swapped mid-walk for a symlink as a symlink.
This is the design of Kubernetes' subPath fix and runc's `securejoin`; see docs/security.md.
The root itself is trusted (stowage's own directories, an admin's `--allowed-path`, a path a
user typed on the command line) and is resolved normally once, when the Tree is opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

_O_PATH = getattr(os, "O_PATH", 0o10000000)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

#: openat2's syscall number is the same on every architecture added since 5.6.
_SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64", "arm64") else -1

_libc = ctypes.CDLL(None, use_errno=True)
_openat2_missing = _SYS_OPENAT2 < 0


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class UnsafePathError(OSError):
    """A name beneath a confined root is a symlink (or leaves the root) where a directory or
    file was expected. Subclasses OSError so per-file error handling reports it like any other
    file error; the message names the path and says nothing was followed."""

    def __init__(
        self, shown: str, why: str = "is a symlink or leaves the directory; not followed"
    ) -> None:
        super().__init__(errno.ELOOP, why, shown)


def check_relpath(rel: str) -> str:
    """*rel* normalised to 'a/b' form; raises ValueError for absolute, '..' or NUL names."""
    if "\0" in rel:
        raise ValueError(f"path {rel!r} contains a NUL character")
    if rel.startswith("/"):
        raise ValueError(f"path {rel!r} is absolute; a relative path was expected")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {rel!r} contains '..'")
    return "/".join(parts)


def _openat2(dirfd: int, rel: str, flags: int, mode: int = 0) -> int:
    """openat2(dirfd, rel, flags, RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS), or the
    component walk where the kernel has no openat2."""
    global _openat2_missing
    if not _openat2_missing:
        # openat2 refuses a mode without O_CREAT/O_TMPFILE (EINVAL), unlike open(2).
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _CONFINED)
        fd = _libc.syscall(
            _SYS_OPENAT2,
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(rel)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter refusing it
            raise OSError(err, os.strerror(err), rel)
        _openat2_missing = True
    return _walk_open(dirfd, rel, flags, mode)


def _walk_open(dirfd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    cur = dirfd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(
                    part, _O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur
                )
            except NotADirectoryError:
                # As openat2 with RESOLVE_NO_SYMLINKS says it: ELOOP for a link on the way.
                if stat.S_ISLNK(os.stat(part, dir_fd=cur, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel) from None
                raise
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
        except NotADirectoryError:
            if stat.S_ISLNK(os.stat(parts[-1], dir_fd=cur, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel) from None
            raise
    finally:
        if cur != dirfd:
            os.close(cur)


class Tree:
    """A directory whose contents are untrusted; all access goes through its descriptor.

    Names are posix-style paths relative to the root ('' is the root itself). Methods raise
    OSError (UnsafePathError when a symlink stood where a directory was needed) with the
    full display path as `filename`, so messages say which file was refused.
    """

    def __init__(self, fd: int, shown: str) -> None:
        self.fd = fd
        self.shown = shown.rstrip("/") or "/"

    # -- opening roots --------------------------------------------------------------------

    @classmethod
    def at(
        cls, path: str | Path, *, create: bool = False, mode: int = 0o755, no_symlinks: bool = False
    ) -> Tree:
        """A trusted root path (symlinks in it are followed, once). *create*: mkdir -p.
        *no_symlinks*: the caller resolved and checked *path* (realpath, allowed paths), so
        it must hold no symlink at all now; one swapped in since is refused, not followed."""
        path = os.fspath(path)
        if create:
            os.makedirs(path, mode=mode, exist_ok=True)
        if no_symlinks:
            with cls.at("/") as root:
                return Tree(root.open_dir(check_relpath(path.lstrip("/"))), path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, path)

    @classmethod
    def beneath(cls, base: str | Path, rel: str) -> Tree:
        """*rel* beneath the trusted *base*, with nothing in *rel* followed: a directory the
        admin allowed (`--allowed-path`) and a path someone else may have swapped beneath it."""
        with cls.at(base) as root:
            return root.subtree(rel)

    def subtree(self, rel: str) -> Tree:
        rel = check_relpath(rel)
        return Tree(self.open_dir(rel), self.display(rel))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def display(self, rel: str) -> str:
        return posixpath.join(self.shown, rel) if rel else self.shown

    def proc_path(self) -> str:
        """The root as a path that names this descriptor, for mount(2): a bind from it binds
        what was opened, whatever the path string names by now."""
        return f"/proc/self/fd/{self.fd}"

    # -- resolution -----------------------------------------------------------------------

    def _resolve(self, rel: str, flags: int, mode: int = 0) -> int:
        try:
            return _openat2(self.fd, rel, flags, mode)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise UnsafePathError(self.display(rel)) from None
            raise OSError(exc.errno, os.strerror(exc.errno or 0), self.display(rel)) from None

    @contextlib.contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, last name) of *rel*, confined."""
        rel = check_relpath(rel)
        if not rel:
            raise IsADirectoryError(errno.EISDIR, "the root itself has no parent", self.shown)
        head, name = posixpath.split(rel)
        if not head:
            yield self.fd, name
            return
        fd = self._resolve(head, _O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _err(self, exc: OSError, rel: str) -> OSError:
        if exc.errno == errno.ELOOP:
            return UnsafePathError(self.display(rel))
        return OSError(exc.errno, exc.strerror, self.display(rel))

    # -- operations -----------------------------------------------------------------------

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """os.open of *rel*; the last component is never followed (O_NOFOLLOW)."""
        rel = check_relpath(rel)
        if not rel:
            return os.dup(self.fd) if flags & os.O_DIRECTORY else self._root_reopen(flags)
        return self._resolve(rel, flags | os.O_NOFOLLOW, mode)

    def open_file(self, rel: str, flags: int = os.O_RDONLY) -> int:
        """Open the existing regular file *rel*. It is first reached with O_PATH (which opens
        nothing: no fifo blocks us, no device driver runs), checked to be a regular file,
        then reopened through its descriptor: what was checked is what gets opened."""
        rel = check_relpath(rel)
        path_fd = self._resolve(rel, _O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(self.display(rel), "is not a regular file; not opened")
            return os.open(f"/proc/self/fd/{path_fd}", flags | os.O_CLOEXEC)
        finally:
            os.close(path_fd)

    def create_file(self, rel: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
        """A new, empty regular file at *rel*, replacing whatever entry was there (a link,
        a fifo or a device someone planted is removed, never opened)."""
        for _ in range(4):
            try:
                return self.open(rel, flags | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                # Removed, then tried again (something re-planted in between: bounded).
                self.unlink(rel, missing_ok=True)
        raise UnsafePathError(self.display(rel), "keeps being replaced while it is created")

    def _root_reopen(self, flags: int) -> int:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)

    def open_dir(self, rel: str) -> int:
        """A readable descriptor of the directory *rel* (a symlink there is refused)."""
        rel = check_relpath(rel)
        if not rel:
            return os.dup(self.fd)
        try:
            return self._resolve(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except NotADirectoryError:
            # A link in the last place reads as ENOTDIR (O_DIRECTORY|O_NOFOLLOW): say so.
            if stat.S_ISLNK(self.lstat(rel).st_mode):
                raise UnsafePathError(self.display(rel)) from None
            raise

    def lstat(self, rel: str) -> os.stat_result:
        rel = check_relpath(rel)
        if not rel:
            return os.fstat(self.fd)
        with self.parent(rel) as (pfd, name):
            try:
                return os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def exists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                return False
            raise
        return True

    def is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(rel).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def readlink(self, rel: str) -> str:
        with self.parent(rel) as (pfd, name):
            try:
                return os.readlink(name, dir_fd=pfd)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        with self.parent(rel) as (pfd, name):
            try:
                os.mkdir(name, mode, dir_fd=pfd)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def makedirs(self, rel: str, mode: int = 0o755, *, replace_links: bool = True) -> bool:
        """mkdir -p beneath the root; True if the last directory was created.

        A symlink where a directory must be is replaced by a directory when *replace_links*
        (a copy whose source says "directory" wins over a link planted in the destination),
        and refused otherwise. A file in the way is an error.
        """
        rel = check_relpath(rel)
        if not rel:
            return False
        cur = self.fd
        created = False
        try:
            done = ""
            for part in rel.split("/"):
                done = posixpath.join(done, part) if done else part
                nxt, created = self._step_dir(cur, part, mode, done, replace_links)
                if cur != self.fd:
                    os.close(cur)
                cur = nxt
        finally:
            if cur != self.fd:
                os.close(cur)
        return created

    def _step_dir(
        self, dirfd: int, name: str, mode: int, shown: str, replace_links: bool
    ) -> tuple[int, bool]:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        created = False
        for _ in range(4):  # bounded: a container re-planting links cannot keep us here
            try:
                return os.open(name, flags, dir_fd=dirfd), created
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise self._err(exc, shown) from None
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise NotADirectoryError(
                        errno.ENOTDIR, "a file is in the way of a directory", self.display(shown)
                    ) from None
                if not replace_links:
                    raise UnsafePathError(self.display(shown)) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dirfd)
            try:
                os.mkdir(name, mode, dir_fd=dirfd)
                created = True
            except FileExistsError:
                continue
        raise UnsafePathError(self.display(shown), "keeps being replaced while it is created")

    def symlink(self, target: str, rel: str) -> None:
        with self.parent(rel) as (pfd, name):
            try:
                os.symlink(target, name, dir_fd=pfd)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def link(self, src_rel: str, dst_rel: str) -> None:
        """A hard link to the entry *src_rel* itself (a symlink there is linked, not followed)."""
        with self.parent(src_rel) as (sfd, sname), self.parent(dst_rel) as (dfd, dname):
            try:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                raise self._err(exc, dst_rel) from None

    def unlink(self, rel: str, *, missing_ok: bool = False) -> None:
        with self.parent(rel) as (pfd, name):
            try:
                os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                if not missing_ok:
                    raise FileNotFoundError(
                        errno.ENOENT, os.strerror(errno.ENOENT), self.display(rel)
                    ) from None
            except OSError as exc:
                raise self._err(exc, rel) from None

    def rename(self, src_rel: str, dst_rel: str) -> None:
        """rename(2) between two names beneath the root: links are moved, never followed."""
        with self.parent(src_rel) as (sfd, sname), self.parent(dst_rel) as (dfd, dname):
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as exc:
                raise self._err(exc, dst_rel) from None

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        """Times of the entry itself (of a symlink: the link's own)."""
        rel = check_relpath(rel)
        if not rel:
            os.utime(self.fd, ns=ns)
            return
        with self.parent(rel) as (pfd, name):
            try:
                os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def lchown(self, rel: str, uid: int, gid: int) -> None:
        rel = check_relpath(rel)
        if not rel:
            os.fchown(self.fd, uid, gid)
            return
        with self.parent(rel) as (pfd, name):
            try:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                raise self._err(exc, rel) from None

    def chmod(self, rel: str, mode: int) -> None:
        """chmod of the entry itself; a symlink there is left alone (links have no mode)."""
        rel = check_relpath(rel)
        if not rel:
            os.fchmod(self.fd, mode)
            return
        fd = self._resolve(rel, _O_PATH | os.O_NOFOLLOW)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return
            # An O_PATH descriptor cannot be fchmod'ed; its /proc magic link names the inode.
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def rmtree(self, rel: str) -> None:
        """Delete *rel* and everything beneath it (a link is deleted, never followed)."""
        with self.parent(rel) as (pfd, name):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=pfd)
                return
            # shutil.rmtree's fd-based walk (Linux) never follows links.
            assert shutil.rmtree.avoids_symlink_attacks
            shutil.rmtree(name, dir_fd=pfd)

    def scandir(self, rel: str) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of each entry of directory *rel*, read through its descriptor."""
        fd = self.open_dir(rel)
        try:
            out = []
            with os.scandir(fd) as it:
                for de in it:
                    try:
                        out.append((de.name, de.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
            return out
        finally:
            os.close(fd)

    def walk(
        self, on_error: Callable[[str, OSError], None], skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, os.stat_result]]:
        """(rel, lstat) of everything beneath the root, parents before children, links not
        followed. A directory that cannot be opened (or was swapped for a link) is reported
        through *on_error* and not descended into; nothing outside is ever listed."""
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                children = self.scandir(rel_dir)
            except OSError as exc:
                on_error(rel_dir, exc)
                continue
            for name, st in children:
                if skip is not None and skip(name):
                    continue
                rel = f"{rel_dir}/{name}" if rel_dir else name
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)

    def fsync(self) -> None:
        os.fsync(self.fd)
