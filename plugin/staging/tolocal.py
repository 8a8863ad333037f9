"""Writing into a local tree: from a local tree (`LocalToLocal`) or from S3 (`S3ToLocal`).

Bytes land only in `.stowage.NAME.part` beside the destination and are renamed over NAME once
verified; files larger than a chunk go through `chunked.py`. Every name is reached through the
destination's `plugin.confined.Tree`: a link planted in the destination is replaced, never
followed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterator

from plugin.s3.metadata import parse_mtime
from plugin.s3.metadata import sanitize as sanitize_object_meta
from plugin.s3.store import ObjectInfo
from plugin.staging import chunked, localfs, mirror
from plugin.staging.context import Direction, Plan, RunContext, Target
from plugin.staging.errors import VerificationError
from plugin.staging.localfs import Entry, temp_paths
from plugin.staging.objcache import ObjectCache, ObjectIdentity
from plugin.staging.scheduling import Task
from plugin.staging.verify import clean_etag, md5_fd, plain_md5, verify_whole

log = logging.getLogger(__name__)

#: Upper bound on workers for local-to-local copies (see LocalToLocal.workers).
LOCAL_JOBS_MAX = 4
#: Mean file size from which a local tree counts as data-heavy (a worker per core).
LOCAL_LARGE_FILE = 256 * 1024
#: Small S3 objects bound for a local tree are fetched this many per task, pipelined: on a
#: loopback server 10,000 x 16 KiB took 7.3 s one request per file, with batches 2.9 s.
GET_BATCH = 32
#: Objects up to this size are batched; a batch holds its bodies in memory (32 MiB at most).
GET_BATCH_MAX = 1 << 20


class ToLocal(Direction):
    """What both ways into a local tree share: directories, part files, metadata, renames."""

    def __init__(self, ctx: RunContext, plan: Plan) -> None:
        super().__init__(ctx, plan)
        #: Destination directories known to exist.
        self._ready_dirs: set[str] = set()
        self._ids = (os.geteuid(), os.getegid())
        owner = ctx.opts.preserve_owner
        self._chown = (os.geteuid() == 0) if owner is None else owner
        self._chown_s3_meta = owner is True
        self._reflink_ok = True

    # -- directories and end of run -------------------------------------------------------------

    def prepare_dirs(self) -> None:
        """Create the destination tree up front (parents sort before children). Directories
        that did not exist before cannot hold an up-to-date file: no per-file lstat there."""
        if self.plan.single:
            return
        self._ready_dirs.add("")
        for d in self.plan.dirs:
            try:
                # A link planted where the source has a directory becomes a directory.
                if self.ctx.dt.makedirs(d.dst):
                    self.plan.fresh_dirs.add(d.dst)
            except NotADirectoryError:
                self.ctx.record_error(d.entry.rel, "cannot create directory: a file is in the way")
                continue
            except OSError as exc:
                self.ctx.record_error(d.entry.rel, f"cannot create directory: {exc.strerror}")
                continue
            self._ready_dirs.add(d.dst)
        self.ctx.result.dirs = len(self.plan.dirs)

    def delete_extraneous(self) -> int:
        return mirror.delete_local(self.ctx, self.plan)

    def finish(self) -> None:
        if self.ctx.opts.fsync:
            self.ctx.dt.fsync()
            os.sync()

    # -- helpers for files ---------------------------------------------------------------------

    def prepare_parent(self, rel: str) -> None:
        """The parent directories of *rel*, created where missing; a symlink planted where a
        directory belongs is replaced by a directory, never followed."""
        parent = os.path.dirname(rel)
        if parent and parent not in self._ready_dirs:
            self.ctx.dt.makedirs(parent)

    def unchanged(self, t: Target) -> bool:
        if not self.ctx.opts.skip_unchanged or os.path.dirname(t.dst) in self.plan.fresh_dirs:
            return False
        try:
            st = self.ctx.dt.lstat(t.dst)
        except OSError:
            return False
        e = t.entry
        if e.kind == "symlink":
            return stat.S_ISLNK(st.st_mode) and self.ctx.dt.readlink(t.dst) == e.target
        return self._unchanged_file(t, st)

    def _unchanged_file(self, t: Target, st: os.stat_result) -> bool:
        raise NotImplementedError

    def owner_for(self, uid: int, gid: int, from_s3: bool) -> tuple[int, int] | None:
        """The owner to give a new local file, or None to leave it as created (root)."""
        if self.ctx.opts.owner is not None:
            return self.ctx.opts.owner
        chown = self._chown_s3_meta if from_s3 else self._chown
        if chown and uid >= 0 and gid >= 0 and (uid, gid) != self._ids:
            return uid, gid
        return None

    def apply_meta(
        self,
        fd: int,
        mode: int,
        atime_ns: int,
        mtime_ns: int,
        uid: int,
        gid: int,
        *,
        from_s3: bool = False,
    ) -> None:
        """Owner, permissions and times of a written file. Permission bits only: setuid,
        setgid and sticky never come from a source (a bucket writer, or a container that
        wrote the host path, must not be able to plant a privileged program)."""
        owner = self.owner_for(uid, gid, from_s3)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode & 0o777)
        os.utime(fd, ns=(atime_ns or mtime_ns, mtime_ns))

    def make_symlink(self, target: str, dst: str, e: Entry, *, from_s3: bool = False) -> None:
        dt = self.ctx.dt
        part, _ = temp_paths(dst)
        dt.unlink(part, missing_ok=True)
        dt.symlink(target, part)
        owner = self.owner_for(e.uid, e.gid, from_s3)
        if owner is not None:
            dt.lchown(part, *owner)
        if e.mtime_ns:
            dt.utime(part, (e.atime_ns or e.mtime_ns, e.mtime_ns))
        self.rename(part, dst)

    def reflink(self, src_fd: int, dst_fd: int) -> bool:
        """FICLONE until the destination filesystem first refuses it; then never again in this
        copy (saves an fstat + ioctl per file on ext4, which has no reflinks)."""
        if not self._reflink_ok:
            return False
        if localfs.try_reflink(src_fd, dst_fd):
            return True
        self._reflink_ok = False
        return False

    def rename(self, part: str, final: str) -> None:
        """Move a finished part file (or link) to its name; whatever entry held the name,
        a planted symlink included, is replaced, not followed."""
        try:
            self.ctx.dt.rename(part, final)
        except IsADirectoryError:
            shown = self.ctx.dt.display(final)
            raise OSError(21, f"destination {shown} is a directory, the source is a file") from None

    def new_part(self, part: str, journal: str, flags: int = os.O_WRONLY) -> int:
        """The part file of a file copied whole. One already there is a chunked copy's that
        an earlier run left (interrupted, or with a smaller chunk size): its journal goes with
        it, or nothing would ever remove it."""
        dt = self.ctx.dt
        try:
            return dt.open(part, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            dt.unlink(journal, missing_ok=True)
            return dt.create_file(part, flags)

    @contextlib.contextmanager
    def whole_part(self, dst: str, flags: int = os.O_WRONLY) -> Iterator[tuple[str, int]]:
        """The part file of *dst* copied whole, open for the block: closed after it, and
        dropped if the block fails."""
        part, journal = temp_paths(dst)
        fd = self.new_part(part, journal, flags)
        try:
            yield part, fd
        except BaseException:
            self.drop_part(part)
            raise
        finally:
            os.close(fd)

    def drop_part(self, part: str) -> None:
        """A failed whole-file copy keeps nothing: no resume for it, and on a full disk its
        bytes are what the next attempt needs."""
        with contextlib.suppress(OSError):
            self.ctx.dt.unlink(part, missing_ok=True)


class LocalToLocal(ToLocal):
    def workers(self) -> int:
        # Local copies are syscall-bound. Many small files: threads beyond the cores left to
        # the kernel only add GIL and inode-lock contention (2 cores, 10,000 x 4 KiB: 1 thread
        # 0.45 s, 2 threads 1.26 s). Large files: the kernel's copy is the work, and a thread
        # per core runs two of them at once (1,000 x 1 MiB: 2 threads 0.32 s, 1 thread 0.43 s).
        result = self.ctx.result
        cores = os.cpu_count() or 1
        files = max(1, result.files_total)
        if result.bytes_total // files < LOCAL_LARGE_FILE:
            cores = max(1, cores - 1)
        return min(max(1, self.ctx.opts.jobs), LOCAL_JOBS_MAX, cores)

    def _unchanged_file(self, t: Target, st: os.stat_result) -> bool:
        e = t.entry
        return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def copy_one(self, t: Target) -> None:
        ctx, e = self.ctx, t.entry
        if self.unchanged(t):
            ctx.file_skipped(t)
            return
        self.prepare_parent(t.dst)
        if e.kind == "symlink":
            self.make_symlink(e.target, t.dst, e)
            ctx.tracker.add_bytes(e.size)
            ctx.file_copied(t)
            return
        src_fd = ctx.st.open_file(t.src)
        try:
            st = os.fstat(src_fd)
            if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
                raise VerificationError(
                    f"{ctx.shown_src(t)} changed while the copy was being planned; "
                    "run the copy again"
                )
            if e.size > ctx.opts.chunk_size:
                chunked.start_local(self, t, src_fd)
                src_fd = -1  # owned by the chunked copy now
                return
            with self.whole_part(t.dst) as (part, dst_fd):
                copied = [0]

                def step(n: int) -> None:
                    copied[0] += n
                    ctx.moved(n)

                if e.size and not self.reflink(src_fd, dst_fd):
                    localfs.copy_range(src_fd, dst_fd, 0, e.size, step, sparse=False)
                elif e.size:
                    step(e.size)
                if copied[0] != e.size:
                    raise VerificationError(f"copied {copied[0]} bytes of {e.size}; not renamed")
                self.apply_meta(dst_fd, e.mode, e.atime_ns, e.mtime_ns, e.uid, e.gid)
            self.rename(part, t.dst)
            ctx.file_copied(t, "size-only")
        finally:
            if src_fd >= 0:
                os.close(src_fd)

    def finish_dirs(self) -> None:
        """Directory modes and mtimes last (writing files into them changes their mtime),
        deepest first."""
        dt = self.ctx.dt
        for d in sorted(self.plan.dirs, key=lambda d: d.entry.rel.count("/"), reverse=True):
            e = d.entry
            try:
                owner = self.owner_for(e.uid, e.gid, from_s3=False)
                if owner is not None:
                    dt.lchown(d.dst, *owner)
                # setgid and sticky on a directory grant nothing (group inheritance,
                # restricted deletion); setuid on a directory means nothing on Linux.
                dt.chmod(d.dst, e.mode & 0o3777)
                dt.utime(d.dst, (e.atime_ns or e.mtime_ns, e.mtime_ns))
            except OSError as exc:
                self.ctx.record_error(e.rel, f"cannot set directory metadata: {exc.strerror}")


class S3ToLocal(ToLocal):
    """Downloads. S3 keeps no metadata of non-empty directories: finish_dirs does nothing."""

    def __init__(self, ctx: RunContext, plan: Plan) -> None:
        super().__init__(ctx, plan)
        self.bucket, self.store = self.s3_side(ctx.src)
        self.cache: ObjectCache | None = ctx.opts.object_cache

    def tasks(self) -> Iterator[Task]:
        """A task per file; small objects in batches of GET_BATCH, fetched in one pipelined
        exchange (per-request overhead is most of their cost)."""
        largest = min(GET_BATCH_MAX, self.ctx.opts.chunk_size)  # larger ones go in chunks
        batch: list[Target] = []
        for t in self.plan.files:
            if t.entry.size <= largest:
                batch.append(t)
                if len(batch) == GET_BATCH:
                    yield self._batch_task(batch)
                    batch = []
            else:
                yield self.task_for(t)
        if batch:
            yield self._batch_task(batch)

    def _batch_task(self, batch: list[Target]) -> Task:
        ctx = self.ctx

        def task() -> None:
            todo: list[Target] = []
            for t in batch:
                try:
                    ctx.check_stop()
                    if self.unchanged(t):
                        ctx.file_skipped(t)
                    elif not self._from_cache(t):
                        todo.append(t)
                except Exception as exc:
                    ctx.file_failed(t, exc)
            if not todo:
                return
            try:
                ctx.check_stop()
                fetched = self.store.get_many(self.bucket, [t.src for t in todo], GET_BATCH_MAX)
            except Exception as exc:  # each file's own GET retries and reports
                log.debug("batched GET failed, fetching one by one: %s", exc)
                fetched = [None] * len(todo)
            for t, got in zip(todo, fetched, strict=True):
                try:
                    ctx.check_stop()
                    self._download(t, prefetched=got, checked=True)
                except Exception as exc:
                    ctx.file_failed(t, exc)

        return task

    def copy_one(self, t: Target) -> None:
        self._download(t)

    def _unchanged_file(self, t: Target, st: os.stat_result) -> bool:
        e, dt = t.entry, self.ctx.dt
        if stat.S_ISLNK(st.st_mode):
            # A symlink stored s3fs-style: the object's body is the target.
            target = os.fsencode(dt.readlink(t.dst))
            return len(target) == e.size and hashlib.md5(target).hexdigest() == clean_etag(e.etag)
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
            return False
        # A small object's ETag is its MD5 (cheap to check locally); a large one's mtime
        # metadata was copied to the file by the previous run.
        etag = plain_md5(e.etag)
        if e.size <= self.ctx.opts.chunk_size and etag is not None:
            try:
                return md5_fd(dt.open_file(t.dst)) == etag
            except OSError:
                return False
        info = self.ctx.retry(f"HEAD {t.src}", lambda: self.store.head(self.bucket, t.src))
        if info is None or info.size != e.size:
            return False
        ns = parse_mtime(info.metadata.get("mtime"))
        want = ns if ns is not None else int(info.last_modified * 1e9)
        return abs(st.st_mtime_ns - want) < 1000  # float-parsing slack

    def meta_from_object(self, info: ObjectInfo, t: Target) -> tuple[int, int, int, int]:
        """(mode, mtime_ns, uid, gid) from s3fs-style metadata, which whoever wrote the
        bucket chose: a value that is not what s3fs writes falls back to the default for this
        one file (logged), and only a regular file or a symlink can come out of it."""
        meta = sanitize_object_meta(info.metadata)
        for key in meta.rejected:
            log.warning(
                "%s: ignoring bad x-amz-meta-%s %r", t.src, key, info.metadata.get(key, "")[:64]
            )
        mtime_ns = meta.mtime_ns if meta.mtime_ns is not None else int(info.last_modified * 1e9)
        return meta.mode, mtime_ns, meta.uid, meta.gid

    # -- host object cache ---------------------------------------------------------------------

    def identity(self, key: str, etag: str, size: int) -> ObjectIdentity | None:
        """The cache identity of one object version; None without a cache or an ETag."""
        clean = etag.strip().strip('"')
        if self.cache is None or not clean:
            return None
        return ObjectIdentity(self.ctx.endpoint, self.bucket, key, clean, size)

    def admit(self, ident: ObjectIdentity | None, fd: int, check: str) -> None:
        """Offer a verified download to the cache: never bytes checked by size alone."""
        if self.cache is None or ident is None or check in ("size-only", "cache"):
            return
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            self.cache.admit(ident, fd)
        except Exception as exc:  # the copy succeeded; a cache problem must not fail it
            log.warning("%s: not kept in the host object cache: %s", ident.key, exc)

    def fill(self, ident: ObjectIdentity, fd: int) -> bool:
        """Fill the empty part file *fd* from the cache; True if it now holds the object."""
        assert self.cache is not None
        try:
            if not self.cache.fill(ident, fd):
                return False  # a miss leaves the file empty
        except Exception as exc:  # a broken cache costs a download, never the file
            log.warning("%s: the host cache failed (%s); downloading", ident.key, exc)
            os.ftruncate(fd, 0)
            return False
        size = os.fstat(fd).st_size
        if size == ident.size:
            return True
        log.warning(
            "%s: the host cache gave %d bytes of %d; downloading", ident.key, size, ident.size
        )
        os.ftruncate(fd, 0)
        return False

    def _from_cache(self, t: Target) -> bool:
        """A small file filled from the cache; its metadata comes from a HEAD (no GET)."""
        ident = self.identity(t.src, t.entry.etag, t.entry.size)
        if ident is None:
            return False
        self.prepare_parent(t.dst)
        with self.whole_part(t.dst, os.O_RDWR) as (part, fd):
            if not self.fill(ident, fd):
                self.drop_part(part)
                return False
            info = self.ctx.retry(f"HEAD {t.src}", lambda: self.store.head(self.bucket, t.src))
            if info is None or clean_etag(info.etag) != clean_etag(ident.etag):
                self.drop_part(part)  # replaced since it was listed: download the new one
                return False
            mode, mtime_ns, uid, gid = self.meta_from_object(info, t)
            if stat.S_ISLNK(mode):
                target = os.pread(fd, ident.size, 0)
                self.drop_part(part)
                link = Entry(t.entry.rel, "symlink", mtime_ns=mtime_ns, uid=uid, gid=gid)
                self.make_symlink(os.fsdecode(target), t.dst, link, from_s3=True)
            else:
                self.apply_meta(fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
                self.rename(part, t.dst)
        self.ctx.file_from_cache(t, ident.size)
        return True

    # -- downloads -----------------------------------------------------------------------------

    def _download(
        self,
        t: Target,
        *,
        prefetched: tuple[ObjectInfo, bytes] | None = None,
        checked: bool = False,
    ) -> None:
        """*prefetched*: the object's info and body, fetched by a batch; *checked*: the
        batch already found the local file out of date (and not in the cache)."""
        ctx, e = self.ctx, t.entry
        if not checked and self.unchanged(t):
            ctx.file_skipped(t)
            return
        self.prepare_parent(t.dst)
        if e.size > ctx.opts.chunk_size:
            chunked.start_download(self, t)
            return
        if not checked and self._from_cache(t):
            return
        buf: bytes | bytearray
        if prefetched is not None:
            info, buf = prefetched
            ctx.moved(len(buf))
        else:
            buf = bytearray()

            def sink(offset: int, data: memoryview, buf: bytearray = buf) -> None:
                del buf[offset:]  # a retried GET starts again from offset 0
                buf.extend(data)
                ctx.moved(len(data))

            info = ctx.retry(f"GET {t.src}", lambda: self.store.get(self.bucket, t.src, sink))
        if len(buf) != info.size:
            raise VerificationError(f"got {len(buf)} bytes of {info.size}; not renamed")
        check = verify_whole(info, buf) if ctx.opts.verify else "size-only"
        mode, mtime_ns, uid, gid = self.meta_from_object(info, t)
        if stat.S_ISLNK(mode):
            link = Entry(e.rel, "symlink", mtime_ns=mtime_ns, uid=uid, gid=gid)
            self.make_symlink(os.fsdecode(bytes(buf)), t.dst, link, from_s3=True)
            ctx.file_copied(t, check)
            return
        ident = self.identity(t.src, info.etag, info.size)
        with self.whole_part(t.dst, os.O_RDWR if ident is not None else os.O_WRONLY) as (part, fd):
            view = memoryview(buf)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            self.apply_meta(fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
            self.admit(ident, fd, check)
        self.rename(part, t.dst)
        ctx.file_copied(t, check)
