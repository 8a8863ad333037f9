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

from plugin.fusefs.cache import DataCache, ReadAhead
from plugin.fusefs.entry import CacheEntry
from plugin.fusefs.errors import (
    FsError,
    InvalidError,
    IsADirError,
    NotADirError,
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
    decode_name,
    join,
    metadata_for,
)
from plugin.fusefs.listing import Listings
from plugin.fusefs.namespace import Namespace
from plugin.fusefs.smallfiles import SmallObjects
from plugin.fusefs.store import DIR_CONTENT_TYPE, ListPage, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC

#: Lookups below one directory that found nothing, in a row, after which the next one
#: sends its HEAD and its LIST together (`ObjectStore.stat`): a program creating files.
CREATE_BURST_MISSES = 2


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
    #: A small object read whole in one GET (smallfiles.py): READs are slices of it.
    whole: bytes | None = None


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
        self._next_fh = 1
        #: Nodes that hold a cache entry (eviction and shutdown walk these, not all inodes).
        self._cached: set[Node] = set()
        #: Upload journals left by a previous run of this cache directory.
        self.pending_journals: list[dict[str, object]] = []
        self._journals_lock = trio.Lock()
        self.small = SmallObjects(store, config.metadata_ttl)
        #: mkdir, symlink, unlink, rmdir, rename (namespace.py); open directories (listing.py).
        self.names = Namespace(self)
        self.listings = Listings(self)

    # -- keys -------------------------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def dir_key(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    @property
    def ttl(self) -> float:
        return self.config.metadata_ttl

    def check_writable(self) -> None:
        if self.config.readonly:
            raise ReadOnlyError("mounted read-only")

    def new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _on_drop(self, node: Node) -> None:
        if node.cache is not None:
            node.cache.close()
            node.cache = None
        self._cached.discard(node)

    # -- name resolution --------------------------------------------------------------------

    def file_attrs(self, info: ObjectInfo, *, meta: bool) -> Attrs:
        d = self.config.defaults
        return attrs_from_metadata(
            info.metadata if meta else {},
            size=info.size,
            last_modified_ns=info.last_modified_ns,
            default_mode=d.file_mode,
            defaults=d,
        )

    def dir_attrs(self, info: ObjectInfo | None) -> Attrs:
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
        """Ask S3 what *path* is: HEAD for a file (unless a GET fetched it ahead), then one
        LIST for a directory (`ObjectStore.stat`). While lookups below the parent keep
        finding nothing, both requests go out together."""
        key = self.key(path)
        dkey = self.dir_key(path)
        parent = self.inodes.find(path.rpartition("/")[0])
        creating = parent is not None and parent.misses_in_a_row >= CREATE_BURST_MISSES
        found = await self.small.lookup_info(key) or await self.store.stat(
            key, dkey, expect_missing=creating
        )
        if parent is not None:
            missed = isinstance(found, ListPage) and not found.files and not found.dirs
            parent.misses_in_a_row = parent.misses_in_a_row + 1 if missed else 0
        if isinstance(found, ObjectInfo):
            return self.inodes.upsert(
                path, self.file_attrs(found, meta=True), meta_loaded=True, etag=found.etag
            )
        page = found
        if not page.files and not page.dirs:
            return None
        marker = None
        if page.files and page.files[0].key == dkey:
            marker = await self.store.head(dkey)
        return self.inodes.upsert(
            path, self.dir_attrs(marker), meta_loaded=True, has_marker=marker is not None
        )

    async def resolve(self, path: str) -> Node | None:
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

    async def child(self, parent_inode: int, name: bytes) -> tuple[Node, str]:
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
            _, path = await self.child(parent_inode, name)
            node = await self.resolve(path)
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
            attrs = self.dir_attrs(marker)
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
            self.file_attrs(info, meta=True),
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
        self.check_writable()
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
                await self.upload(node)
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
            self.check_writable()
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
        fh = self.new_fh()
        self._files[fh] = FileHandle(
            node=node, readahead=self.cache.read_ahead(), writable=writable
        )
        node.open_handles += 1
        return fh

    async def create(
        self, parent_inode: int, name: bytes, mode: int, uid: int, gid: int
    ) -> tuple[int, Node]:
        self.check_writable()
        _, path = await self.child(parent_inode, name)
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
        whole = await self._read_whole(h, entry)
        if whole is not None:
            data: bytes | memoryview = memoryview(whole)[offset : offset + size]
            if offset + size >= len(whole):
                h.whole = None  # read to its end: the page cache has it, many open files
            self.cache.stats.bytes_read += len(data)
            return data
        try:
            data = await self.cache.read(entry, offset, size, h.readahead)
        except StaleError:
            entry.end_stream()
            if not entry.dirty:
                # Drop the mixed-version copy; the next open starts afresh.
                entry.present.clip(0)
            raise
        self.cache.stats.bytes_read += len(data)
        return data

    async def _read_whole(self, h: FileHandle, entry: CacheEntry) -> bytes | None:
        """A small unchanged object in one GET (or fetched ahead), kept on the handle; None
        when the cache file must serve the read (local bytes, a large or cached object)."""
        if entry.dirty or entry.size != entry.remote_size:
            h.whole = None  # written meanwhile: the cache file has the bytes now
            return None
        if h.whole is not None:
            return h.whole
        key = entry.remote_key
        if (
            h.writable
            or key is None
            or not self.small.wanted(entry.remote_size)
            or entry.present.covers(0, entry.remote_size)
        ):
            return None
        body = self.small.take(key, entry.remote_etag)
        if body is None:
            body = await self.small.get(key, entry.remote_size, entry.remote_etag)
        if entry.dirty or entry.remote_key != key:
            return None  # written or renamed while the GET ran
        h.whole = body
        self.small.note_read(key)
        return body

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self.check_writable()
        h = self._handle(fh)
        entry = self._ensure_cache(h.node)
        n = await self.cache.write(entry, offset, data)
        self.cache.stats.bytes_written += n
        h.node.attrs.size = entry.size
        h.node.attrs.mtime_ns = time.time_ns()
        return n

    async def upload(self, node: Node) -> None:
        entry = node.cache
        if entry is None or not entry.dirty or node.deleted:
            return
        node.attrs.size = entry.size
        etag = await self.cache.flush(entry, self.key(node.path), metadata_for(node.attrs))
        self.small.forget(self.key(node.path))
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
            await self.upload(h.node)

    async def fsync(self, fh: int) -> None:
        await self.upload(self._handle(fh).node)

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
                await self.upload(node)
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
                await self.upload(node)
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
                        await self.upload(node)
                    except FsError as exc:
                        log.warning("retry of %s failed: %s", node.path, exc)
            if self.pending_journals:
                await self._retry_journals()
