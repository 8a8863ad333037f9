"""Large files into a local tree, chunk by chunk: from S3 (ranged GETs, one task per chunk on
the worker pool) or from a local file (one kernel copy stream per file).

Each chunk is `pwrite`n at its offset into a preallocated part file, then its index appended to
the journal beside it, so a rerun copies only the missing chunks. The file is verified (size,
plus the store's CRC or the MD5 ETag, computed while the chunks land) before it is renamed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plugin.confined import Tree
from plugin.s3.store import FileSink, ObjectInfo, Sink
from plugin.staging import localfs
from plugin.staging.context import SplitFile, Target
from plugin.staging.errors import SourceNotFoundError, VerificationError
from plugin.staging.hasher import Hasher
from plugin.staging.journal import ChunkJournal
from plugin.staging.localfs import Entry, temp_paths
from plugin.staging.verify import MD5_RE, CrcCheck, clean_etag, crc_check_for, guess_part_size

if TYPE_CHECKING:
    from plugin.staging.tolocal import S3ToLocal, ToLocal

log = logging.getLogger(__name__)


def start_local(local: ToLocal, t: Target, src_fd: int) -> None:
    """Copy a large local file (*src_fd*, now owned here) chunk by chunk, journaled."""
    e = t.entry
    local.ctx.open_fds.add(src_fd)
    identity: dict[str, Any] = {"size": e.size, "mtime_ns": e.mtime_ns}
    _start(local, None, t, e, identity, src_fd, None)


def start_download(down: S3ToLocal, t: Target) -> None:
    """Download a large object chunk by chunk, journaled; from the host cache if it has it."""
    ctx = down.ctx
    info = ctx.retry(f"HEAD {t.src}", lambda: down.store.head(down.bucket, t.src))
    if info is None:
        raise SourceNotFoundError(f"{t.src} disappeared from the bucket")
    identity: dict[str, Any] = {"size": info.size, "etag": clean_etag(info.etag)}
    e = Entry(t.entry.rel, "file", size=info.size, etag=info.etag)
    _start(down, down, t, e, identity, -1, info)


def _has_size(tree: Tree, rel: str, size: int) -> bool:
    try:
        st = tree.lstat(rel)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _start(
    local: ToLocal,
    down: S3ToLocal | None,
    t: Target,
    e: Entry,
    identity: dict[str, Any],
    src_fd: int,
    info: ObjectInfo | None,
) -> None:
    ctx, dt = local.ctx, local.ctx.dt
    chunk = ctx.opts.chunk_size
    part, journal_path = temp_paths(t.dst)
    journal = ChunkJournal(dt, journal_path, {**identity, "chunk": chunk})
    done = journal.load()
    nchunks = max(1, (e.size + chunk - 1) // chunk)
    fresh = done is None or not _has_size(dt, part, e.size)
    if fresh:
        # Only a fresh part file is offered to the host cache: a resumable one keeps the
        # chunks an earlier run downloaded.
        done = set()
        fd = dt.create_file(part, os.O_RDWR)
        if down is not None and info is not None and _filled_from_cache(down, t, info, fd, part):
            dt.unlink(journal_path, missing_ok=True)  # an earlier run's, of another version
            return
        os.ftruncate(fd, e.size)
        if src_fd < 0 and e.size:
            # Reserve the space now: ENOSPC at the start, not after minutes of download.
            try:
                os.posix_fallocate(fd, 0, e.size)
            except OSError as exc:
                if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: fine without
                    os.close(fd)
                    raise
    else:
        fd = dt.open_file(part, os.O_RDWR)
    assert done is not None
    ctx.open_fds.add(fd)
    journal.start(fresh)
    ctx.journals.add(journal)
    if src_fd >= 0 and fresh and local.reflink(src_fd, fd):
        done = set(range(nchunks))
        ctx.moved(e.size)
    hasher: Hasher | None = None
    crc_check: CrcCheck | None = None
    if info is not None and ctx.opts.verify:
        crc_check = crc_check_for(t.src, info, chunk)
        if crc_check is None:
            hasher = _hasher_for(info, fd, chunk, 2 * ctx.opts.jobs)
            if hasher is not None:
                ctx.hashers.add(hasher)
    job = ChunkedFile(
        local, down, t, e, info, fd, src_fd, part, journal, nchunks, hasher, crc_check
    )
    resumed = 0
    recheck: list[int] = []
    for i in sorted(done):
        if i < nchunks:
            resumed += min(chunk, e.size - i * chunk)
            if hasher is not None:
                hasher.mark(i)
            if crc_check is not None:
                # The CRC of a chunk written by an earlier run comes from the part file
                # (a pread pass over those chunks only, in parallel with the downloads):
                # what a crash lost on the way to the disk is caught, not trusted.
                recheck.append(i)
    if resumed:
        log.info("%s: resuming, %d of %d chunks already done", ctx.shown_dst(t), len(done), nchunks)
        ctx.resumed(resumed)
    pending = [i for i in range(nchunks) if i not in done]
    job.remaining = len(pending) + len(recheck)
    if not pending and not recheck:
        job.finish()
        return
    if src_fd >= 0:
        # Local source: one kernel copy stream per file. Parallel copy_file_range calls on
        # one inode contend on its lock (rclone disables multi-thread local copies too);
        # other workers copy other files meanwhile.
        for i in pending:
            job.chunk_task(i)()
        return
    ctx.scheduler.push(
        [*(job.chunk_task(i) for i in pending), *(job.recheck_task(i) for i in recheck)]
    )


def _hasher_for(info: ObjectInfo, fd: int, chunk: int, lead: int) -> Hasher | None:
    """The MD5 check of a chunked download whose ETag is a plain or (with a known part
    size) multipart MD5; None for an opaque ETag."""
    etag = clean_etag(info.etag)
    if not MD5_RE.match(etag):
        return None
    part_size = None
    if "-" in etag:
        part_size = guess_part_size(info, int(etag.split("-")[1]), chunk)
        if part_size is None:
            return None
    return Hasher(fd, info.size, chunk, part_size, lead=lead)


def _filled_from_cache(down: S3ToLocal, t: Target, info: ObjectInfo, fd: int, part: str) -> bool:
    """Fill the new, empty part file *fd* from the host cache; on a hit the file is in place
    (metadata applied, renamed) and *fd* closed; on a miss *fd* stays open and empty."""
    ident = down.identity(t.src, info.etag, info.size)
    try:
        if ident is None or not down.fill(ident, fd):
            return False
        mode, mtime_ns, uid, gid = down.meta_from_object(info, t)
        down.apply_meta(fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
        down.rename(part, t.dst)
    except BaseException:
        os.close(fd)
        down.drop_part(part)
        raise
    os.close(fd)
    down.ctx.file_from_cache(t, info.size)
    return True


@dataclass(eq=False)
class ChunkedFile(SplitFile):
    """One large file being filled chunk by chunk from S3 or a local file."""

    local: ToLocal
    down: S3ToLocal | None
    t: Target
    entry: Entry
    info: ObjectInfo | None
    fd: int
    src_fd: int
    part: str
    journal: ChunkJournal
    nchunks: int
    hasher: Hasher | None
    crc: CrcCheck | None = None

    def __post_init__(self) -> None:
        super().__init__(self.local.ctx, self.t, self.fd, self.nchunks)

    def _given_up(self) -> bool:
        return self.error is not None or self.ctx.stopping()

    def chunk_task(self, index: int) -> Callable[[], None]:
        return self.piece(self._chunk, index)

    def recheck_task(self, index: int) -> Callable[[], None]:
        """CRC of a chunk an earlier run wrote, read back from the part file."""
        assert self.crc is not None
        crc_check, fd = self.crc, self.fd
        return self.piece(lambda i: crc_check.from_file(i, fd), index)

    def _chunk(self, index: int) -> None:
        if self.hasher is not None:
            # A failed chunk is never hashed: its siblings must not wait for the hash.
            self.hasher.wait_for_room(index, self._given_up)
            if self._given_up():
                self.ctx.check_stop()
                return  # another chunk failed; finish() reports that error
        self._copy_chunk(index)
        self.journal.record(index)
        if self.hasher is not None:
            self.hasher.mark(index)

    def _copy_chunk(self, index: int) -> None:
        ctx = self.ctx
        chunk = ctx.opts.chunk_size
        start = index * chunk
        length = min(chunk, self.entry.size - start)
        if self.down is None:
            moved = [0]

            def step(n: int) -> None:
                moved[0] += n
                ctx.moved(n)

            localfs.copy_range(self.src_fd, self.fd, start, length, step)
            # Holes are not copied but count as done for progress.
            ctx.tracker.add_bytes(length - moved[0])
            return
        store, bucket, key, fd = self.down.store, self.down.bucket, self.t.src, self.fd
        got = [0]
        # The CRC of the chunk, computed on the buffer just written (awscrt releases the GIL:
        # the workers' CRCs run in parallel, no pass over the file at the end).
        feed = self.crc.feeder(index) if self.crc is not None else None

        def landed(n: int) -> None:
            got[0] += n
            ctx.moved(n)

        def write(offset: int, data: memoryview) -> None:
            localfs.pwrite_all(fd, data, offset)
            if feed is not None:
                feed.update(offset, data)
            landed(len(data))

        # Bytes no CRC needs may go from the socket to the file without user space.
        sink: Sink = write if feed is not None else FileSink(fd, write, landed)

        def attempt() -> ObjectInfo:
            # A retry asks only for what the broken stream did not deliver.
            return store.get(bucket, key, sink, start + got[0], length - got[0])

        info = ctx.retry(f"GET {key} bytes {start}-{start + length - 1}", attempt)
        if (
            self.info is not None
            and info.etag
            and clean_etag(info.etag) != clean_etag(self.info.etag)
        ):
            raise VerificationError(
                f"{key} was replaced during the copy (ETag changed); run the copy again"
            )
        if got[0] != length:
            raise VerificationError(f"chunk {index}: got {got[0]} bytes of {length}")
        if feed is not None and self.crc is not None:
            if feed.complete():
                self.crc.store(index, feed.values)
            else:  # bytes came out of order (a store's retry): read the chunk back
                self.crc.from_file(index, fd)

    def _verify(self) -> str:
        """Size, then the store's CRC or the MD5 ETag; returns the check made. A corrupt part
        file is deleted with its journal: it must not be resumed."""
        e = self.entry
        size = os.fstat(self.fd).st_size
        if size != e.size:
            raise VerificationError(f"part file has {size} bytes of {e.size}; not renamed")
        if self.crc is not None:
            got = self.crc.result()
            if got != self.crc.want:
                self._discard()
                raise VerificationError(
                    f"{self.crc.algorithm} {got} does not match the store's "
                    f"{self.crc.want}; not renamed, rerun the copy"
                )
            return self.crc.algorithm
        if self.hasher is not None:
            got = self.hasher.result()
            want = clean_etag(self.info.etag) if self.info else ""
            if got != want:
                self._discard()
                raise VerificationError(
                    f"MD5 {got} does not match ETag {want}; not renamed, rerun the copy"
                )
            return "md5"
        return "size-only"

    def _discard(self) -> None:
        self.journal.remove()
        self.ctx.dt.unlink(self.part, missing_ok=True)

    def finish(self) -> None:
        ctx, t, e, local = self.ctx, self.t, self.entry, self.local
        try:
            if self.error is not None:
                if self.hasher is not None:
                    self.hasher.stop()
                raise self.error
            check = self._verify()
            if self.down is not None and self.info is not None:
                mode, mtime_ns, uid, gid = self.down.meta_from_object(self.info, t)
                local.apply_meta(self.fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
            else:
                local.apply_meta(self.fd, e.mode, e.atime_ns, e.mtime_ns, e.uid, e.gid)
            local.rename(self.part, t.dst)
            self.journal.remove()
            ctx.journals.discard(self.journal)
            if self.down is not None and self.info is not None:
                ident = self.down.identity(t.src, self.info.etag, self.info.size)
                self.down.admit(ident, self.fd, check)
            ctx.file_copied(t, check)
        except BaseException as exc:
            self.journal.close()
            ctx.file_failed(t, exc)
        finally:
            if self.hasher is not None:
                ctx.hashers.discard(self.hasher)
            ctx.close_fd(self.fd)
            ctx.close_fd(self.src_fd)
