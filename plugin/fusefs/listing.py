"""Directory listings of the S3 filesystem: open directory handles filled page by page.

Split from `fs.py`. A listing page (ListObjectsV2, 1,000 keys) becomes entries with the
attributes the listing gives; s3fs keeps mode, owner and mtime in user metadata the listing
does not return, so the page's entries are HEADed in parallel and the kernel may then cache
them for `metadata_ttl` instead of sending one LOOKUP (one HEAD) per `stat`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from plugin.fusefs.errors import FsError, NotADirError
from plugin.fusefs.inodes import Node, join
from plugin.fusefs.store import ObjectInfo

if TYPE_CHECKING:
    from plugin.fusefs.fs import S3Filesystem

log = logging.getLogger(__name__)

#: Parallel HEADs while listing a directory (the store's thread limiter caps them too).
LIST_HEAD_CONCURRENCY = 32


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


class Listings:
    """The open directory handles of one `S3Filesystem`."""

    def __init__(self, fs: S3Filesystem) -> None:
        self.fs = fs
        self.handles: dict[int, DirHandle] = {}

    async def opendir(self, inode: int) -> int:
        node = self.fs.inodes.get(inode)
        if not node.is_dir:
            raise NotADirError(node.path)
        fh = self.fs.new_fh()
        self.handles[fh] = DirHandle(node=node)
        return fh

    async def dir_entry(self, fh: int, index: int) -> tuple[str, Node] | None:
        """Entry *index* of an open directory, fetching listing pages as needed."""
        dh = self.handles[fh]
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
            dkey = self.fs.dir_key(node.path)
            page = await self.fs.store.list_page(dkey, dh.token if dh.started else None)
            dh.started = True
            dh.token = page.next_token
            page_files, page_dirs = page.files, page.dirs
        dkey = self.fs.dir_key(node.path)
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
                child = self.fs.inodes.upsert(path, self.fs.dir_attrs(None), meta_loaded=False)
            else:
                assert not isinstance(marker, bool)
                child = self.fs.inodes.upsert(
                    path, self.fs.dir_attrs(marker), meta_loaded=True, has_marker=marker is not None
                )
            dh.entries.append((name, child))
        for name, info in new_files:
            path = join(node.path, name)
            full = heads.get(path)
            if isinstance(full, ObjectInfo):
                child = self.fs.inodes.upsert(
                    path, self.fs.file_attrs(full, meta=True), meta_loaded=True, etag=full.etag
                )
            else:
                child = self.fs.inodes.upsert(
                    path, self.fs.file_attrs(info, meta=False), meta_loaded=False, etag=info.etag
                )
            dh.entries.append((name, child))
        if dh.token is None:
            # New files not uploaded yet and marker-less empty directories.
            for child in self.fs.inodes.children_local(node.path):
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
            known = self.fs.inodes.find(path)
            if known is not None and (known.local_only or known.is_fresh(self.fs.ttl)):
                continue
            if self.fs.config.dir_markers:
                jobs.append((path, self.fs.dir_key(path), True))
            else:
                # No markers on this server: a directory has nothing to HEAD.
                out[path] = None
        for name, info in files:
            path = join(dir_path, name)
            known = self.fs.inodes.find(path)
            if (
                known is not None
                and known.is_fresh(self.fs.ttl)
                and known.etag == info.etag
                and not known.replaced
            ):
                continue
            jobs.append((path, info.key, False))
        if not jobs or self.fs.ttl <= 0:
            return out
        started = time.monotonic()
        answers = await self.fs.store.head_many(
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
        self.handles.pop(fh, None)
