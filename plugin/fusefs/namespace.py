"""Namespace changes of the S3 filesystem: mkdir, symlink, unlink, rmdir and rename.

Split from `fs.py` (the filesystem core, which resolves names and owns the inode table and
open files); this class holds no state of its own and works through the core. Renaming a
directory is a server-side copy of every object below it and then one batch delete, so a
failure part-way leaves the source complete (S3 has no atomic rename).
"""

from __future__ import annotations

import logging
import stat
import time
from typing import TYPE_CHECKING

import trio

from plugin.fusefs.errors import (
    ExistsError,
    InvalidError,
    IsADirError,
    NotADirError,
    NotEmptyError,
    NotFoundError,
)
from plugin.fusefs.inodes import Attrs, Node, metadata_for
from plugin.fusefs.store import DIR_CONTENT_TYPE, ObjectInfo

if TYPE_CHECKING:
    from plugin.fusefs.fs import S3Filesystem

log = logging.getLogger(__name__)

#: Parallel server-side copies while renaming a directory.
RENAME_CONCURRENCY = 16


class Namespace:
    """Creating, deleting and renaming names, for one `S3Filesystem`."""

    def __init__(self, fs: S3Filesystem) -> None:
        self.fs = fs

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        self.fs.check_writable()
        _, path = await self.fs.child(parent_inode, name)
        attrs = Attrs(
            mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=time.time_ns()
        )
        if self.fs.config.dir_markers:
            await self.fs.store.put_bytes(
                self.fs.dir_key(path), b"", metadata_for(attrs), DIR_CONTENT_TYPE
            )
            node = self.fs.inodes.upsert(path, attrs, meta_loaded=True, has_marker=True)
        else:
            node = self.fs.inodes.add_local(path, attrs)
        self.fs.inodes.ref(node)
        return node

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Node:
        self.fs.check_writable()
        _, path = await self.fs.child(parent_inode, name)
        attrs = Attrs(
            mode=stat.S_IFLNK | 0o777, uid=uid, gid=gid, size=len(target), mtime_ns=time.time_ns()
        )
        etag = await self.fs.store.put_bytes(self.fs.key(path), target, metadata_for(attrs))
        node = self.fs.inodes.upsert(path, attrs, meta_loaded=True, etag=etag)
        node.symlink_target = target
        self.fs.inodes.ref(node)
        return node

    async def _to_remove(self, parent_inode: int, name: bytes) -> tuple[str, Node]:
        """The path and node of *name*, which unlink or rmdir is about to remove."""
        self.fs.check_writable()
        _, path = await self.fs.child(parent_inode, name)
        node = await self.fs.resolve(path)
        if node is None:
            raise NotFoundError(path)
        return path, node

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        path, node = await self._to_remove(parent_inode, name)
        if node.is_dir:
            raise IsADirError(path)
        if not node.local_only:
            await self.fs.store.delete(self.fs.key(path))
        self.fs.small.forget(self.fs.key(path))
        if node.cache is not None and node.cache.dirty:
            # Unlinked data is never uploaded; an open handle keeps reading the local copy.
            node.cache.dirty = False
            node.cache.journal_path.unlink(missing_ok=True)
        self.fs.inodes.remove_path(path)

    async def _dir_is_empty(self, node: Node) -> bool:
        if any(not n.deleted for n in self.fs.inodes.children_local(node.path)):
            return False
        if node.local_only:
            return True
        dkey = self.fs.dir_key(node.path)
        page = await self.fs.store.list_page(dkey, None, delimiter="/", max_keys=2)
        return not page.dirs and all(f.key == dkey for f in page.files)

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        path, node = await self._to_remove(parent_inode, name)
        if not node.is_dir:
            raise NotADirError(path)
        if not await self._dir_is_empty(node):
            raise NotEmptyError(path)
        if not node.local_only and (node.has_marker or self.fs.config.dir_markers):
            await self.fs.store.delete(self.fs.dir_key(path))
        self.fs.inodes.remove_path(path)

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        *,
        noreplace: bool = False,
    ) -> None:
        self.fs.check_writable()
        _, old = await self.fs.child(old_parent, old_name)
        _, new = await self.fs.child(new_parent, new_name)
        if old == new:
            return
        src = await self.fs.resolve(old)
        if src is None:
            raise NotFoundError(old)
        dst = await self.fs.resolve(new)
        if dst is not None:
            if noreplace:
                raise ExistsError(new)
            if src.is_dir and not dst.is_dir:
                raise NotADirError(new)
            if not src.is_dir and dst.is_dir:
                raise IsADirError(new)
            if dst.is_dir and not await self._dir_is_empty(dst):
                raise NotEmptyError(new)
        if src.is_dir:
            if new.startswith(old + "/"):
                raise InvalidError(f"cannot move {old} into itself")
            await self._rename_dir(src, old, new, dst)
        else:
            await self._rename_file(src, old, new)
        if dst is not None and dst.cache is not None:
            dst.cache.dirty = False
        self.fs.small.forget(self.fs.key(old))
        self.fs.small.forget(self.fs.key(new))
        self.fs.inodes.rename(old, new)
        for node in [src, *self.fs.inodes.below(new)]:
            if node.cache is not None and node.cache.remote_key is not None:
                node.cache.remote_key = self.fs.key(node.path)
        log.info("renamed %s -> %s", old, new)

    async def _rename_file(self, src: Node, old: str, new: str) -> None:
        if src.local_only:
            return  # never uploaded: the first flush writes the new key
        if src.cache is not None and src.cache.dirty:
            await self.fs.upload(src)
        await self.fs.store.copy(self.fs.key(old), self.fs.key(new), size=src.attrs.size)
        await self.fs.store.delete(self.fs.key(old))

    async def _rename_dir(self, src: Node, old: str, new: str, dst: Node | None) -> None:
        for node in self.fs.inodes.below(old):
            if node.cache is not None and node.cache.dirty and not node.local_only:
                await self.fs.upload(node)
        if dst is not None and dst.has_marker:
            await self.fs.store.delete(self.fs.dir_key(new))
        if src.local_only:
            return
        old_dkey, new_dkey = self.fs.dir_key(old), self.fs.dir_key(new)
        objects = await self.fs.store.list_keys(old_dkey)
        limiter = trio.Semaphore(RENAME_CONCURRENCY)

        async def _copy(info: ObjectInfo) -> None:
            async with limiter:
                await self.fs.store.copy(
                    info.key, new_dkey + info.key[len(old_dkey) :], size=info.size
                )

        async with trio.open_nursery() as nursery:
            for info in objects:
                nursery.start_soon(_copy, info)
        # Only after every copy succeeded: a failure above leaves the source complete.
        await self.fs.store.delete_many([o.key for o in objects])
