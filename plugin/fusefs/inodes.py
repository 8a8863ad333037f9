"""Inode table: the kernel's inode numbers <-> paths in the bucket, with lookup counts.

S3 has no inodes, so numbers are handed out on first sight of a path and dropped when the
kernel forgets them (lookup count 0) and no handle is open. Paths are relative to the mount
root, '/'-separated, '' for the root itself; the object key is `prefix + path`.

Attributes follow s3fs-fuse's object metadata so buckets stay interoperable; the codec is
`plugin.s3.metadata`, shared with the copy engine. Objects without it get the mount's
defaults.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pyfuse3

from plugin.fusefs.entry import CacheEntry
from plugin.fusefs.errors import InvalidError, NotFoundError
from plugin.s3 import metadata as s3meta

log = logging.getLogger(__name__)

NS = 1_000_000_000


@dataclass(frozen=True)
class Defaults:
    """Ownership and permissions for objects written by tools that store no s3fs metadata."""

    uid: int = 0
    gid: int = 0
    umask: int = 0o022

    @property
    def file_mode(self) -> int:
        return stat.S_IFREG | (0o666 & ~self.umask)

    @property
    def dir_mode(self) -> int:
        return stat.S_IFDIR | (0o777 & ~self.umask)


@dataclass
class Attrs:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def metadata_for(attrs: Attrs) -> dict[str, str]:
    """The s3fs-compatible user metadata for *attrs* (boto3 adds `x-amz-meta-`)."""
    return s3meta.encode(attrs.mode, attrs.uid, attrs.gid, attrs.mtime_ns)


def attrs_from_metadata(
    metadata: Mapping[str, str],
    *,
    size: int,
    last_modified_ns: int,
    default_mode: int,
    defaults: Defaults,
) -> Attrs:
    """Attributes of an object from its metadata; anything missing or garbled gets a default
    (keys compared case-insensitively: some servers return `Mode`, not `mode`)."""
    got = s3meta.decode(
        metadata,
        default_mode=default_mode,
        default_uid=defaults.uid,
        default_gid=defaults.gid,
        last_modified_ns=last_modified_ns,
    )
    return Attrs(mode=got.mode, uid=got.uid, gid=got.gid, size=size, mtime_ns=got.mtime_ns)


@dataclass(eq=False)
class Node:
    """One inode. `meta_loaded` is False while the attributes come only from a listing
    (ListObjectsV2 has no user metadata), so the kernel must not cache them for long."""

    inode: int
    path: str
    attrs: Attrs
    meta_loaded: bool = False
    #: time.monotonic() when the attributes were last read from S3.
    fetched_at: float = 0.0
    etag: str | None = None
    lookups: int = 0
    open_handles: int = 0
    #: A directory with a `dir/` marker object (its metadata can be stored there).
    has_marker: bool = False
    #: Exists only in this process: a new file not uploaded yet, or an empty directory on a
    #: server that cannot store markers. Listings add these; lookups answer them locally.
    local_only: bool = False
    #: Unlinked or replaced while the kernel still holds a reference.
    deleted: bool = False
    cache: CacheEntry | None = field(default=None, repr=False)
    symlink_target: bytes | None = None
    #: Another client replaced the object; the next lookup hands out a new inode.
    replaced: bool = False
    #: Lookups below this directory that found nothing, in a row: a program is creating
    #: files here (see `S3Filesystem._stat_path`).
    misses_in_a_row: int = 0

    @property
    def is_dir(self) -> bool:
        return self.attrs.is_dir

    def is_fresh(self, ttl: float) -> bool:
        return self.meta_loaded and time.monotonic() - self.fetched_at < ttl

    def entry(self, ttl: float) -> pyfuse3.EntryAttributes:
        """Kernel attributes; the timeout is zero while `meta_loaded` is False so a stat
        after readdir comes back to us and fetches the real mode/owner."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.inode
        e.generation = 0
        # Zero timeouts make the kernel revalidate with a LOOKUP before the next use, and
        # our lookup HEADs the object for its real type and owner.
        timeout = ttl if self.meta_loaded else 0
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        size = self.cache.size if self.cache is not None else self.attrs.size
        e.st_mode = self.attrs.mode
        e.st_nlink = 2 if self.is_dir else 1
        e.st_uid = self.attrs.uid
        e.st_gid = self.attrs.gid
        e.st_rdev = 0
        e.st_size = size
        e.st_blksize = 1 << 20
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = self.attrs.mtime_ns
        e.st_mtime_ns = self.attrs.mtime_ns
        e.st_ctime_ns = self.attrs.mtime_ns
        return e


class InodeTable:
    """inode <-> path maps plus kernel lookup counts (pyfuse3 passthroughfs style)."""

    def __init__(self, root_attrs: Attrs) -> None:
        self._next_inode = pyfuse3.ROOT_INODE + 1
        root = Node(
            inode=pyfuse3.ROOT_INODE,
            path="",
            attrs=root_attrs,
            meta_loaded=True,
            fetched_at=float("inf"),
        )
        # The root is never forgotten by the kernel.
        root.lookups = 1
        self._by_inode: dict[int, Node] = {root.inode: root}
        self._by_path: dict[str, Node] = {"": root}
        #: Called when a node leaves the table, so its cache entry can be closed.
        self.on_drop: Callable[[Node], None] | None = None

    def __len__(self) -> int:
        return len(self._by_inode)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._by_inode.values()))

    def get(self, inode: int) -> Node:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise NotFoundError(f"inode {inode}") from None

    def find(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def upsert(
        self,
        path: str,
        attrs: Attrs,
        *,
        meta_loaded: bool,
        etag: str | None = None,
        has_marker: bool | None = None,
        new_inode_ok: bool = True,
    ) -> Node:
        """The node for *path*, created or refreshed with what S3 just told us.

        `meta_loaded=False` means the attributes come from a listing: it knows file vs
        directory, size and ETag, not mode or owner. A node whose data is open with local
        changes, or that exists only here, keeps its attributes: it is newer than S3.
        A changed file type gets a new inode, because the kernel refuses to see the type of
        an inode change (it marks the inode bad).

        An object replaced by another client (new ETag) also gets a new inode when nobody has
        it open: with the writeback cache the kernel keeps its own i_size for a cached inode
        and would cut the new content to the old length. Only name lookups may hand out the
        new number (`new_inode_ok`); a GETATTR must answer for the inode it was asked about,
        so it only marks the node `replaced` for the next lookup.
        """
        node = self._by_path.get(path)
        if node is not None:
            if node.local_only or (node.cache is not None and node.cache.dirty):
                return node
            replaced = node.replaced or (
                node.etag is not None and etag is not None and etag != node.etag
            )
            if replaced and not node.is_dir and node.open_handles == 0:
                if new_inode_ok:
                    self._detach(node)
                    node = None
                else:
                    node.replaced = True
        if node is not None:
            same_type = stat.S_IFMT(node.attrs.mode) == stat.S_IFMT(attrs.mode)
            if not meta_loaded:
                if node.is_dir != attrs.is_dir:
                    self._detach(node)
                    node = None
                elif node.meta_loaded:
                    if etag is not None and etag != node.etag:
                        node.attrs.size = attrs.size
                        node.etag = etag
                        node.meta_loaded = False
                    if has_marker is not None:
                        node.has_marker = has_marker
                    return node
                elif not same_type:
                    # Two guesses from listings: keep the inode, it has no loaded type yet.
                    attrs.mode = node.attrs.mode
            elif not same_type:
                self._detach(node)
                node = None
        if node is None:
            node = Node(inode=self._next_inode, path=path, attrs=attrs)
            self._next_inode += 1
            self._by_inode[node.inode] = node
            self._by_path[path] = node
        if node.etag is not None and etag != node.etag:
            node.symlink_target = None
        node.attrs = attrs
        node.meta_loaded = meta_loaded
        node.fetched_at = time.monotonic() if meta_loaded else 0.0
        node.etag = etag
        if has_marker is not None:
            node.has_marker = has_marker
        return node

    def add_local(self, path: str, attrs: Attrs) -> Node:
        """A node that exists only here until its first upload (new file, marker-less dir)."""
        old = self._by_path.get(path)
        if old is not None:
            self._detach(old)
        node = Node(
            inode=self._next_inode,
            path=path,
            attrs=attrs,
            meta_loaded=True,
            fetched_at=time.monotonic(),
            local_only=True,
        )
        self._next_inode += 1
        self._by_inode[node.inode] = node
        self._by_path[path] = node
        return node

    def remove_path(self, path: str) -> None:
        """*path* is gone from the namespace; its inode lives on while the kernel holds it."""
        node = self._by_path.get(path)
        if node is not None:
            self._detach(node)

    def _detach(self, node: Node) -> None:
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        node.deleted = True
        self._maybe_drop(node)

    def rename(self, old: str, new: str) -> None:
        """Move *old* (and, for a directory, every known path below it) to *new*."""
        self.remove_path(new)
        moved = [n for p, n in self._by_path.items() if p == old or p.startswith(old + "/")]
        for node in moved:
            del self._by_path[node.path]
        for node in moved:
            node.path = new + node.path[len(old) :]
            self._by_path[node.path] = node

    def children_local(self, dir_path: str) -> list[Node]:
        """Nodes directly below *dir_path* that S3 does not know about yet."""
        base = dir_path + "/" if dir_path else ""
        return [
            n
            for p, n in self._by_path.items()
            if n.local_only and p.startswith(base) and p and "/" not in p[len(base) :]
        ]

    def below(self, dir_path: str) -> list[Node]:
        base = dir_path + "/" if dir_path else ""
        return [n for p, n in self._by_path.items() if p.startswith(base) and p != dir_path]

    def ref(self, node: Node, count: int = 1) -> None:
        node.lookups += count

    def forget(self, inode: int, count: int) -> None:
        node = self._by_inode.get(inode)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def release(self, node: Node) -> None:
        """A handle was closed: the inode may now be droppable."""
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.inode == pyfuse3.ROOT_INODE or node.lookups > 0 or node.open_handles > 0:
            return
        if node.cache is not None and node.cache.dirty and not node.deleted:
            # Unuploaded data: keep the node so a later open sees it and retries can find it.
            return
        if node.local_only and not node.deleted:
            # Only this table remembers it; dropping would make it vanish from listings.
            return
        self._by_inode.pop(node.inode, None)
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        if self.on_drop is not None:
            self.on_drop(node)


def decode_name(name: bytes) -> str:
    """S3 keys are UTF-8; refuse names that cannot be one."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidError(f"name {name!r} is not valid UTF-8") from None


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name
