"""pyfuse3 request handlers: thin adapters from kernel requests to `S3Filesystem`.

This is the only place that raises `FUSEError`. Any other exception escaping a handler would
end `pyfuse3.main()` and leave a dead mount ("Transport endpoint is not connected"), so every
handler goes through `_guard`, which logs the traceback and answers EIO instead.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
from pyfuse3 import FUSEError

from plugin.fusefs import errors
from plugin.fusefs.fs import S3Filesystem

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Domain error -> errno. Order matters: subclasses before their bases.
ERRNO_MAP: tuple[tuple[type[errors.FsError], int], ...] = (
    (errors.NotFoundError, errno.ENOENT),
    (errors.ExistsError, errno.EEXIST),
    (errors.NotEmptyError, errno.ENOTEMPTY),
    (errors.IsADirError, errno.EISDIR),
    (errors.NotADirError, errno.ENOTDIR),
    (errors.ReadOnlyError, errno.EROFS),
    (errors.UnsupportedError, errno.EOPNOTSUPP),
    (errors.InvalidError, errno.EINVAL),
    (errors.StaleError, errno.ESTALE),
    (errors.RemoteError, errno.EIO),
)


def to_errno(exc: errors.FsError) -> int:
    for cls, code in ERRNO_MAP:
        if isinstance(exc, cls):
            return code
    return errno.EIO


def _guard(fn: F) -> F:
    """Translate domain errors to FUSEError; log and EIO anything unexpected."""

    @functools.wraps(fn)
    async def wrapper(self: S3Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except errors.FsError as exc:
            code = to_errno(exc)
            level = logging.WARNING if isinstance(exc, errors.RemoteError) else logging.DEBUG
            log.log(level, "%s%r: %s (errno %d)", fn.__name__, args[:2], exc, code)
            raise FUSEError(code) from None
        except OSError as exc:
            # Local trouble with the cache directory (ENOSPC, EDQUOT, EIO of the disk): pass
            # the real errno on, it tells the user more than EIO.
            log.error("%s%r: local I/O error: %s", fn.__name__, args[:2], exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None

    return cast(F, wrapper)


class S3Operations(pyfuse3.Operations):
    """FUSE operations for one S3 bucket prefix.

    Attributes:
        fs: the filesystem core every handler delegates to.
    """

    fs: S3Filesystem
    # Lets the kernel merge small writes into max_write-sized requests and keeps i_size/mtime
    # in the kernel; dirty pages are written back before FLUSH, so close() still sees errors.
    enable_writeback_cache = True

    def __init__(
        self,
        fs: S3Filesystem,
        *,
        writeback_cache: bool = True,
        on_first_open: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.fs = fs
        self.enable_writeback_cache = writeback_cache
        #: Runs once, at the first open: only after INIT has been answered (the kernel
        #: resets the BDI read-ahead from its INIT reply) and before any file's read-ahead
        #: state is set up.
        self._on_first_open = on_first_open

    @property
    def _ttl(self) -> float:
        return self.fs.ttl

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        return (await self.fs.lookup(parent_inode, name)).entry(self._ttl)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self.fs.forget(list(inode_list))
        except Exception:
            # forget() must not raise at all, not even FUSEError.
            log.exception("forget failed")

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return (await self.fs.getattr(inode)).entry(self._ttl)

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug(
            "setattr %d mode=%s uid=%s gid=%s size=%s mtime=%s fh=%s",
            inode,
            fields.update_mode,
            fields.update_uid,
            fields.update_gid,
            fields.update_size,
            fields.update_mtime,
            fh,
        )
        node = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
        )
        return node.entry(self._ttl)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(inode)

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        log.debug("mkdir %d %r", parent_inode, name)
        node = await self.fs.names.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        return node.entry(self._ttl)

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # Device nodes, FIFOs and sockets have no S3 representation worth guessing at.
        raise errors.UnsupportedError("mknod")

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        log.debug("unlink %d %r", parent_inode, name)
        await self.fs.names.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        log.debug("rmdir %d %r", parent_inode, name)
        await self.fs.names.rmdir(parent_inode, name)

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.fs.names.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return node.entry(self._ttl)

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        log.debug("rename %d %r -> %d %r", parent_inode_old, name_old, parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            # An atomic swap of two keys is impossible with copy + delete.
            raise errors.InvalidError("RENAME_EXCHANGE is not supported")
        await self.fs.names.rename(
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
        )

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # EPERM is what link(2) documents for "filesystem does not support hard links".
        raise FUSEError(errno.EPERM)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        log.debug("open %d flags=%#o", inode, flags)
        if self._on_first_open is not None:
            hook, self._on_first_open = self._on_first_open, None
            hook()
        fh, keep = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_guard
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        log.debug("create %d %r", parent_inode, name)
        fh, node = await self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh), node.entry(self._ttl)

    @_guard
    # pyfuse3 replies with any contiguous buffer (PyObject_GetBuffer); its stub says bytes.
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.listings.opendir(inode)

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        index = start_id
        while True:
            item = await self.fs.listings.dir_entry(fh, index)
            if item is None:
                return
            name, node = item
            if not pyfuse3.readdir_reply(
                token, name.encode("utf-8"), node.entry(self._ttl), index + 1
            ):
                self.fs.inodes.release(node)
                return
            # readdirplus: each reply that the kernel accepted is a lookup.
            self.fs.inodes.ref(node)
            index += 1

    @_guard
    async def releasedir(self, fh: int) -> None:
        self.fs.listings.releasedir(fh)

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # S3 has no capacity; report a large constant so `df` and free-space checks pass.
        st = pyfuse3.StatvfsData()
        st.f_bsize = 1 << 20
        st.f_frsize = 4096
        st.f_blocks = (1 << 50) // st.f_frsize
        st.f_bfree = st.f_blocks
        st.f_bavail = st.f_blocks
        st.f_files = 1 << 32
        st.f_ffree = 1 << 32
        st.f_favail = 1 << 32
        st.f_namemax = 255
        return st
