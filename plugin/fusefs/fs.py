"""Filesystem semantics on top of S3: names, directories, metadata, open files.

Layout in the bucket (s3fs-fuse compatible): a file or symlink is the object `prefix + path`;
a directory exists if a `path/` marker object exists or any key starts with `path/`. A symlink's
body is its target and its `x-amz-meta-mode` has S_IFLNK. Everything here raises the domain
errors of `errors.py`; `operations.py` translates them for the kernel.

All state lives on the trio loop; only `ObjectStore` leaves it (in worker threads). Code
between two `await`s is therefore atomic with respect to other FUSE requests.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field

import trio

from plugin.fusefs.cache import CacheEntry, DataCache, ReadAhead
from plugin.fusefs.errors import (
    ExistsError,
    FsError,
    InvalidError,
    IsADirError,
    NotADirError,
    NotEmptyError,
    NotFoundError,
    ReadOnlyError,
    StaleError,
)
from plugin.fusefs.inodes import (
    Attrs,
    Defaults,
    InodeTable,
    Node,
    attrs_from_metadata,
    metadata_for,
)
from plugin.fusefs.store import DIR_CONTENT_TYPE, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

#: Parallel server-side copies while renaming a directory.
RENAME_CONCURRENCY = 16
#: Parallel HEADs while listing a directory (the store's thread limiter caps them too).
LIST_HEAD_CONCURRENCY = 32

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC


@dataclass(frozen=True)
class FsConfig:
    prefix: str = ""
    defaults: Defaults = field(default_factory=Defaults)
    #: Seconds that attributes from S3 are trusted, here and in the kernel.
    metadata_ttl: float = 10.0
    readonly: bool = False
    #: Store directories as `dir/` marker objects (s3fs style). Servers that map keys to
    #: files (rclone serve s3 on a directory) cannot hold them; then empty directories live
    #: only in this process until a file is written below them.
    dir_markers: bool = True
    #: Seconds between retries of uploads that failed after their file was closed.
    retry_interval: float = 30.0


@dataclass
class FileHandle:
    node: Node
    readahead: ReadAhead
    #: Only closing a handle that could write uploads; a reader's close must not fail
    #: because someone else's upload does.
    writable: bool


@dataclass
class DirHandle:
    """A directory being listed. Entries accumulate page by page, so `start_id` is an index
    and a 10,000-entry listing costs ten ListObjectsV2 calls, not one per READDIR."""

    node: Node
    entries: list[tuple[str, Node]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    token: str | None = None
    started: bool = False
    done: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)


def decode_name(name: bytes) -> str:
    """S3 keys are UTF-8; refuse names that cannot be one."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidError(f"name {name!r} is not valid UTF-8") from None


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class S3Filesystem:
    """The filesystem core: one bucket prefix, one inode table, one data cache."""

    def __init__(self, store: ObjectStore, cache: DataCache, config: FsConfig) -> None:
        self.store = store
        self.cache = cache
        self.config = config
        prefix = config.prefix.strip("/")
        self.prefix = prefix + "/" if prefix else ""
        now = time.time_ns()
        d = config.defaults
        self.inodes = InodeTable(Attrs(mode=d.dir_mode, uid=d.uid, gid=d.gid, size=0, mtime_ns=now))
        self.inodes.on_drop = self._on_drop
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        #: Nodes that hold a cache entry (eviction and shutdown walk these, not all inodes).
        self._cached: set[Node] = set()
        #: Upload journals left by a previous run of this cache directory.
        self.pending_journals: list[dict[str, object]] = []
        self._journals_lock = trio.Lock()

    # -- keys -------------------------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def dir_key(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    @property
    def ttl(self) -> float:
        return self.config.metadata_ttl

    def _check_writable(self) -> None:
        if self.config.readonly:
            raise ReadOnlyError("mounted read-only")

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _on_drop(self, node: Node) -> None:
        if node.cache is not None:
            node.cache.close()
            node.cache = None
        self._cached.discard(node)

    # -- name resolution --------------------------------------------------------------------

    def _file_attrs(self, info: ObjectInfo, *, meta: bool) -> Attrs:
        d = self.config.defaults
        return attrs_from_metadata(
            info.metadata if meta else {},
            size=info.size,
            last_modified_ns=info.last_modified_ns,
            default_mode=d.file_mode,
            defaults=d,
        )

    def _dir_attrs(self, info: ObjectInfo | None) -> Attrs:
        d = self.config.defaults
        if info is None:
            return Attrs(mode=d.dir_mode, uid=d.uid, gid=d.gid, size=0, mtime_ns=time.time_ns())
        return attrs_from_metadata(
            info.metadata,
            size=0,
            last_modified_ns=info.last_modified_ns,
            default_mode=d.dir_mode,
            defaults=d,
        )

    async def _stat_path(self, path: str) -> Node | None:
        """Ask S3 what *path* is: HEAD for a file, then one LIST for a directory."""
        info = await self.store.head(self.key(path))
        if info is not None:
            return self.inodes.upsert(
                path, self._file_attrs(info, meta=True), meta_loaded=True, etag=info.etag
            )
        dkey = self.dir_key(path)
        page = await self.store.list_page(dkey, None, delimiter="/", max_keys=1)
        if not page.files and not page.dirs:
            return None
        marker = None
        if page.files and page.files[0].key == dkey:
            marker = await self.store.head(dkey)
        return self.inodes.upsert(
            path, self._dir_attrs(marker), meta_loaded=True, has_marker=marker is not None
        )

    async def _resolve(self, path: str) -> Node | None:
        """The node at *path*, from the table if fresh enough, else from S3."""
        node = self.inodes.find(path)
        if node is not None and (
            node.local_only
            or (node.is_fresh(self.ttl) and not node.replaced)
            or (node.cache is not None and node.cache.dirty)
            or node.path == ""
        ):
            return node
        found = await self._stat_path(path)
        if found is None:
            if node is not None:
                self.inodes.remove_path(path)
            return None
        return found

    async def _child(self, parent_inode: int, name: bytes) -> tuple[Node, str]:
        parent = self.inodes.get(parent_inode)
        if not parent.is_dir:
            raise NotADirError(parent.path)
        return parent, join(parent.path, decode_name(name))

    async def lookup(self, parent_inode: int, name: bytes) -> Node:
        parent = self.inodes.get(parent_inode)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self.inodes.find(parent.path.rpartition("/")[0]) if parent.path else parent
        else:
            _, path = await self._child(parent_inode, name)
            node = await self._resolve(path)
        if node is None:
            raise NotFoundError(name.decode("utf-8", "replace"))
        self.inodes.ref(node)
        return node

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    async def getattr(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node.deleted or node.local_only or node.path == "" or node.is_fresh(self.ttl):
            return node
        if node.cache is not None and node.cache.dirty:
            return node
        if node.is_dir:
            marker = await self.store.head(self.dir_key(node.path))
            attrs = self._dir_attrs(marker)
            if marker is None and node.meta_loaded:
                attrs = node.attrs
            return self.inodes.upsert(
                node.path, attrs, meta_loaded=True, has_marker=marker is not None
            )
        info = await self.store.head(self.key(node.path))
        if info is None:
            raise NotFoundError(node.path)
        fresh = self.inodes.upsert(
            node.path,
            self._file_attrs(info, meta=True),
            meta_loaded=True,
            etag=info.etag,
            new_inode_ok=False,
        )
        if fresh is not node:
            # The object changed type; this inode is stale. A new LOOKUP gets the new one.
            raise NotFoundError(node.path)
        return node

    # -- metadata ---------------------------------------------------------------------------

    async def setattr(
        self,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Node:
        node = await self.getattr(inode)
        self._check_writable()
        if size is not None:
            if node.is_dir:
                raise IsADirError(node.path)
            entry = self._ensure_cache(node)
            await self.cache.truncate(entry, size)
            node.attrs.size = size
            node.attrs.mtime_ns = time.time_ns()
        changed = False
        if mode is not None:
            node.attrs.mode = stat.S_IFMT(node.attrs.mode) | (mode & 0o7777)
            changed = True
        if uid is not None:
            node.attrs.uid = uid
            changed = True
        if gid is not None:
            node.attrs.gid = gid
            changed = True
        if mtime_ns is not None:
            node.attrs.mtime_ns = mtime_ns
            changed = True
        if node.cache is not None and node.cache.dirty:
            if fh is None and node.open_handles == 0:
                # truncate(2) on a closed file: nobody will close it, so upload now.
                await self._upload(node)
            return node
        if changed and not node.local_only:
            await self._store_metadata(node)
        return node

    async def _store_metadata(self, node: Node) -> None:
        """Persist mode/owner/mtime in the object's s3fs headers (copy onto itself)."""
        meta = metadata_for(node.attrs)
        if node.is_dir:
            if node.path == "":
                return  # the root has no marker in s3fs either
            dkey = self.dir_key(node.path)
            if node.has_marker:
                await self.store.copy(
                    dkey, dkey, size=0, metadata=meta, content_type=DIR_CONTENT_TYPE
                )
            elif self.config.dir_markers:
                await self.store.put_bytes(dkey, b"", meta, DIR_CONTENT_TYPE)
                node.has_marker = True
            return
        key = self.key(node.path)
        etag = await self.store.copy(key, key, size=node.attrs.size, metadata=meta)
        node.etag = etag or node.etag
        if node.cache is not None and etag:
            node.cache.remote_etag = etag
        node.fetched_at = time.monotonic()

    async def readlink(self, inode: int) -> bytes:
        node = self.inodes.get(inode)
        if not node.attrs.is_symlink:
            raise InvalidError(node.path)
        if node.symlink_target is None:
            node.symlink_target = await self.store.get_bytes(self.key(node.path))
        return node.symlink_target

    # -- namespace changes ------------------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        self._check_writable()
        _, path = await self._child(parent_inode, name)
        attrs = Attrs(
            mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=time.time_ns()
        )
        if self.config.dir_markers:
            await self.store.put_bytes(
                self.dir_key(path), b"", metadata_for(attrs), DIR_CONTENT_TYPE
            )
            node = self.inodes.upsert(path, attrs, meta_loaded=True, has_marker=True)
        else:
            node = self.inodes.add_local(path, attrs)
        self.inodes.ref(node)
        return node

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Node:
        self._check_writable()
        _, path = await self._child(parent_inode, name)
        attrs = Attrs(
            mode=stat.S_IFLNK | 0o777, uid=uid, gid=gid, size=len(target), mtime_ns=time.time_ns()
        )
        etag = await self.store.put_bytes(self.key(path), target, metadata_for(attrs))
        node = self.inodes.upsert(path, attrs, meta_loaded=True, etag=etag)
        node.symlink_target = target
        self.inodes.ref(node)
        return node

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        self._check_writable()
        _, path = await self._child(parent_inode, name)
        node = await self._resolve(path)
        if node is None:
            raise NotFoundError(path)
        if node.is_dir:
            raise IsADirError(path)
        if not node.local_only:
            await self.store.delete(self.key(path))
        if node.cache is not None and node.cache.dirty:
            # Unlinked data is never uploaded; an open handle keeps reading the local copy.
            node.cache.dirty = False
            node.cache.journal_path.unlink(missing_ok=True)
        self.inodes.remove_path(path)

    async def _dir_is_empty(self, node: Node) -> bool:
        if any(not n.deleted for n in self.inodes.children_local(node.path)):
            return False
        if node.local_only:
            return True
        dkey = self.dir_key(node.path)
        page = await self.store.list_page(dkey, None, delimiter="/", max_keys=2)
        return not page.dirs and all(f.key == dkey for f in page.files)

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        self._check_writable()
        _, path = await self._child(parent_inode, name)
        node = await self._resolve(path)
        if node is None:
            raise NotFoundError(path)
        if not node.is_dir:
            raise NotADirError(path)
        if not await self._dir_is_empty(node):
            raise NotEmptyError(path)
        if not node.local_only and (node.has_marker or self.config.dir_markers):
            await self.store.delete(self.dir_key(path))
        self.inodes.remove_path(path)

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        *,
        noreplace: bool = False,
    ) -> None:
        self._check_writable()
        _, old = await self._child(old_parent, old_name)
        _, new = await self._child(new_parent, new_name)
        if old == new:
            return
        src = await self._resolve(old)
        if src is None:
            raise NotFoundError(old)
        dst = await self._resolve(new)
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
        self.inodes.rename(old, new)
        for node in [src, *self.inodes.below(new)]:
            if node.cache is not None and node.cache.remote_key is not None:
                node.cache.remote_key = self.key(node.path)
        log.info("renamed %s -> %s", old, new)

    async def _rename_file(self, src: Node, old: str, new: str) -> None:
        if src.local_only:
            return  # never uploaded: the first flush writes the new key
        if src.cache is not None and src.cache.dirty:
            await self._upload(src)
        await self.store.copy(self.key(old), self.key(new), size=src.attrs.size)
        await self.store.delete(self.key(old))

    async def _rename_dir(self, src: Node, old: str, new: str, dst: Node | None) -> None:
        for node in self.inodes.below(old):
            if node.cache is not None and node.cache.dirty and not node.local_only:
                await self._upload(node)
        if dst is not None and dst.has_marker:
            await self.store.delete(self.dir_key(new))
        if src.local_only:
            return
        old_dkey, new_dkey = self.dir_key(old), self.dir_key(new)
        objects = await self.store.list_keys(old_dkey)
        limiter = trio.Semaphore(RENAME_CONCURRENCY)

        async def _copy(info: ObjectInfo) -> None:
            async with limiter:
                await self.store.copy(
                    info.key, new_dkey + info.key[len(old_dkey) :], size=info.size
                )

        async with trio.open_nursery() as nursery:
            for info in objects:
                nursery.start_soon(_copy, info)
        # Only after every copy succeeded: a failure above leaves the source complete.
        await self.store.delete_many([o.key for o in objects])

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        node = self.inodes.get(inode)
        if not node.is_dir:
            raise NotADirError(node.path)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node=node)
        return fh

    async def dir_entry(self, fh: int, index: int) -> tuple[str, Node] | None:
        """Entry *index* of an open directory, fetching listing pages as needed."""
        dh = self._dirs[fh]
        async with dh.lock:
            while index >= len(dh.entries) and not dh.done:
                await self._next_page(dh)
        if index < len(dh.entries):
            return dh.entries[index]
        return None

    async def _next_page(self, dh: DirHandle) -> None:
        node = dh.node
        if node.local_only:
            page_files: list[ObjectInfo] = []
            page_dirs: list[str] = []
            dh.token = None
        else:
            dkey = self.dir_key(node.path)
            page = await self.store.list_page(dkey, dh.token if dh.started else None)
            dh.started = True
            dh.token = page.next_token
            page_files, page_dirs = page.files, page.dirs
        dkey = self.dir_key(node.path)
        new_dirs: list[str] = []
        for p in page_dirs:
            name = p[len(dkey) :].rstrip("/")
            if name and name not in dh.seen:
                dh.seen.add(name)
                new_dirs.append(name)
        new_files: list[tuple[str, ObjectInfo]] = []
        for info in page_files:
            name = info.key[len(dkey) :]
            if not name or "/" in name or name in dh.seen:
                continue  # the directory's own marker
            dh.seen.add(name)
            new_files.append((name, info))
        heads = await self._head_many(node.path, new_dirs, new_files)
        for name in new_dirs:
            path = join(node.path, name)
            marker = heads.get(path, False)
            if marker is False:  # not asked, or the HEAD failed: the kernel must ask again
                child = self.inodes.upsert(path, self._dir_attrs(None), meta_loaded=False)
            else:
                assert not isinstance(marker, bool)
                child = self.inodes.upsert(
                    path, self._dir_attrs(marker), meta_loaded=True, has_marker=marker is not None
                )
            dh.entries.append((name, child))
        for name, info in new_files:
            path = join(node.path, name)
            full = heads.get(path)
            if isinstance(full, ObjectInfo):
                child = self.inodes.upsert(
                    path, self._file_attrs(full, meta=True), meta_loaded=True, etag=full.etag
                )
            else:
                child = self.inodes.upsert(
                    path, self._file_attrs(info, meta=False), meta_loaded=False, etag=info.etag
                )
            dh.entries.append((name, child))
        if dh.token is None:
            # New files not uploaded yet and marker-less empty directories.
            for child in self.inodes.children_local(node.path):
                name = child.path.rpartition("/")[2]
                if name not in dh.seen:
                    dh.seen.add(name)
                    dh.entries.append((name, child))
            dh.done = True

    async def _head_many(
        self, dir_path: str, dirs: list[str], files: list[tuple[str, ObjectInfo]]
    ) -> dict[str, ObjectInfo | bool | None]:
        """HEAD a listing page's entries in parallel: s3fs keeps mode/owner/mtime in user
        metadata that ListObjectsV2 does not return, and with it the kernel may cache the
        entries for `metadata_ttl` instead of sending one LOOKUP (one HEAD) per `stat`.

        Returns path -> ObjectInfo (files, directory markers), None (no marker) or False
        (not fetched). Fresh nodes are not asked again; failures only cost the TTL.
        """
        out: dict[str, ObjectInfo | bool | None] = {}
        jobs: list[tuple[str, str, bool]] = []
        for name in dirs:
            path = join(dir_path, name)
            known = self.inodes.find(path)
            if known is not None and (known.local_only or known.is_fresh(self.ttl)):
                continue
            if self.config.dir_markers:
                jobs.append((path, self.dir_key(path), True))
            else:
                # No markers on this server: a directory has nothing to HEAD.
                out[path] = None
        for name, info in files:
            path = join(dir_path, name)
            known = self.inodes.find(path)
            if (
                known is not None
                and known.is_fresh(self.ttl)
                and known.etag == info.etag
                and not known.replaced
            ):
                continue
            jobs.append((path, info.key, False))
        if not jobs or self.ttl <= 0:
            return out
        started = time.monotonic()
        answers = await self.store.head_many(
            [key for _, key, _ in jobs], concurrency=LIST_HEAD_CONCURRENCY
        )
        log.debug("listing %s: %d HEADs in %.3f s", dir_path, len(jobs), time.monotonic() - started)
        for (path, key, is_dir), answer in zip(jobs, answers, strict=True):
            if isinstance(answer, FsError):
                log.debug("HEAD %s while listing failed: %s", key, answer)
            elif answer is not None or is_dir:
                out[path] = answer
            # else: deleted since the listing; the listing's guess stays unconfirmed
        return out

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- file data --------------------------------------------------------------------------

    def _ensure_cache(self, node: Node) -> CacheEntry:
        if node.cache is None:
            node.cache = self.cache.new_entry(
                remote_key=None if node.local_only else self.key(node.path),
                remote_size=0 if node.local_only else node.attrs.size,
                remote_etag=node.etag,
            )
            self._cached.add(node)
        return node.cache

    async def open(self, inode: int, flags: int) -> tuple[int, bool]:
        """Returns (fh, keep_cache): keep the kernel's page cache if our copy is unchanged."""
        if flags & _WRITE_FLAGS:
            self._check_writable()
        node = await self.getattr(inode)
        if node.is_dir:
            raise IsADirError(node.path)
        keep = node.cache is not None
        if (
            node.cache is not None
            and not node.cache.dirty
            and node.open_handles == 0
            and (node.cache.remote_etag != node.etag or node.cache.size != node.attrs.size)
        ):
            log.debug("%s changed on the server, dropping cached data", node.path)
            self._on_drop(node)
            keep = False
        entry = self._ensure_cache(node)
        if flags & os.O_TRUNC:
            # libfuse negotiates FUSE_CAP_ATOMIC_O_TRUNC: the kernel sends no SETATTR for
            # O_TRUNC, the truncation is ours to do here.
            await self.cache.truncate(entry, 0)
            node.attrs.size = 0
            node.attrs.mtime_ns = time.time_ns()
            keep = False
        return self._open_handle(node, writable=bool(flags & (os.O_WRONLY | os.O_RDWR))), keep

    def _open_handle(self, node: Node, *, writable: bool) -> int:
        fh = self._new_fh()
        self._files[fh] = FileHandle(
            node=node, readahead=self.cache.read_ahead(), writable=writable
        )
        node.open_handles += 1
        return fh

    async def create(
        self, parent_inode: int, name: bytes, mode: int, uid: int, gid: int
    ) -> tuple[int, Node]:
        self._check_writable()
        _, path = await self._child(parent_inode, name)
        attrs = Attrs(
            mode=stat.S_IFREG | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=time.time_ns()
        )
        node = self.inodes.add_local(path, attrs)
        try:
            entry = self._ensure_cache(node)
        except BaseException:
            # No data file, no handle: leave no phantom entry behind in listings.
            self.inodes.remove_path(path)
            raise
        # Dirty from birth, so an empty file is uploaded on close too.
        entry.dirty = True
        self.inodes.ref(node)
        return self._open_handle(node, writable=True), node

    def _handle(self, fh: int) -> FileHandle:
        try:
            return self._files[fh]
        except KeyError:
            raise InvalidError(f"bad file handle {fh}") from None

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        h = self._handle(fh)
        entry = self._ensure_cache(h.node)
        try:
            return await self.cache.read(entry, offset, size, h.readahead)
        except StaleError:
            entry.end_stream()
            if not entry.dirty:
                # Drop the mixed-version copy; the next open starts afresh.
                entry.present.clip(0)
            raise

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._check_writable()
        h = self._handle(fh)
        entry = self._ensure_cache(h.node)
        n = await self.cache.write(entry, offset, data)
        h.node.attrs.size = entry.size
        h.node.attrs.mtime_ns = time.time_ns()
        return n

    async def _upload(self, node: Node) -> None:
        entry = node.cache
        if entry is None or not entry.dirty or node.deleted:
            return
        node.attrs.size = entry.size
        etag = await self.cache.flush(entry, self.key(node.path), metadata_for(node.attrs))
        if etag is not None or not entry.dirty:
            node.etag = etag
            node.local_only = False
            node.meta_loaded = True
            node.fetched_at = time.monotonic()
            self._ensure_parent_marker(node)

    def _ensure_parent_marker(self, node: Node) -> None:
        """Marker-less local directories above a file become real once the file is uploaded."""
        path = node.path.rpartition("/")[0]
        while path:
            parent = self.inodes.find(path)
            if parent is None or not parent.local_only:
                return
            parent.local_only = False
            path = path.rpartition("/")[0]

    async def flush(self, fh: int) -> None:
        """close(2): upload if this handle could have written."""
        h = self._handle(fh)
        if h.writable:
            await self._upload(h.node)

    async def fsync(self, fh: int) -> None:
        await self._upload(self._handle(fh).node)

    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_handles -= 1
        if node.open_handles == 0 and node.cache is not None:
            node.cache.end_stream()  # its buffers serve other readers now
        try:
            if (
                h.writable
                and node.cache is not None
                and node.cache.dirty
                and not node.cache.upload_failed
            ):
                # Data written through mmap can arrive after the last flush.
                await self._upload(node)
        finally:
            self.inodes.release(node)
            self.cache.evict(list(self._cached))

    # -- whole filesystem -------------------------------------------------------------------

    def dirty_nodes(self) -> list[Node]:
        return [n for n in self._cached if n.cache is not None and n.cache.dirty and not n.deleted]

    async def flush_all(self) -> int:
        """Upload every dirty file and every upload journaled by a previous run (shutdown).
        Returns how many could not be uploaded."""
        failed = 0
        for node in self.dirty_nodes():
            try:
                await self._upload(node)
            except FsError as exc:
                failed += 1
                log.error("could not upload %s before exit: %s", node.path, exc)
        return failed + await self._retry_journals()

    async def _retry_journals(self) -> int:
        """Upload what a previous run journaled; returns how many are still pending. An
        upload is dropped from the list the moment it is done, so a cancelled pass (shutdown)
        leaves only what is really pending for `flush_all`. One pass at a time: a SIGTERM
        right after the mount went live starts one while the background task's runs."""
        async with self._journals_lock:
            for info in list(self.pending_journals):
                if await self.cache.upload_journaled(info):
                    self.pending_journals.remove(info)
            return len(self.pending_journals)

    async def retry_failed_uploads(self) -> None:
        """Background task: uploads journaled by a previous run at once (a container that
        lives less than `retry_interval` must not leave them behind again), then, every
        `retry_interval`, uploads that failed after their file was closed and those journals."""
        if self.pending_journals:
            await self._retry_journals()
        while True:
            await trio.sleep(self.config.retry_interval)
            for node in self.dirty_nodes():
                if node.cache is not None and node.cache.upload_failed and not node.open_handles:
                    try:
                        await self._upload(node)
                    except FsError as exc:
                        log.warning("retry of %s failed: %s", node.path, exc)
            if self.pending_journals:
                await self._retry_journals()
