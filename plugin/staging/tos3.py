"""Uploads from a local tree to S3 (`LocalToS3`): small files and symlinks as one PUT each,
large files as multipart uploads whose parts (ListParts) are the resume journal, empty
directories as `dir/` marker objects.

Object metadata is s3fs-compatible: `mtime` (seconds, with nanoseconds when there are any, as
s3fs writes it), `mode` (full st_mode, decimal), `uid`, `gid`; a symlink is an object whose
body is its target.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from plugin.s3.metadata import format_mtime, parse_mtime
from plugin.s3.store import PartInfo, UploadInfo
from plugin.staging import mirror
from plugin.staging.context import Direction, Plan, RunContext, SplitFile, Target, bind
from plugin.staging.errors import StagingError, VerificationError
from plugin.staging.localfs import Entry
from plugin.staging.verify import MD5_RE, clean_etag, multipart_etag, part_size_for, plain_md5

log = logging.getLogger(__name__)


def object_meta(mode: int, mtime_ns: int, e: Entry) -> dict[str, str]:
    """s3fs metadata of an uploaded entry; times in the one codec's form (plugin.s3.metadata)."""
    meta = {"mtime": format_mtime(mtime_ns), "mode": str(mode)}
    if e.uid >= 0:
        meta["uid"] = str(e.uid)
        meta["gid"] = str(e.gid)
    return meta


def _initiated(u: UploadInfo) -> float:
    return u.initiated


class LocalToS3(Direction):
    def __init__(self, ctx: RunContext, plan: Plan) -> None:
        super().__init__(ctx, plan)
        self.bucket, self.store = self.s3_side(ctx.dst)

    def copy_one(self, t: Target) -> None:
        ctx, e = self.ctx, t.entry
        if e.kind == "symlink":
            data = os.fsencode(e.target)
            if self._unchanged(t, data):
                ctx.file_skipped(t)
                return
            self._put_small(t, data, stat.S_IFLNK | 0o777, e.mtime_ns)
            return
        part_size = part_size_for(e.size, ctx.opts.chunk_size)
        if e.size <= part_size:
            with open(ctx.st.open_file(t.src), "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read(part_size + 1)
            if len(data) != e.size or st.st_mtime_ns != e.mtime_ns:
                raise VerificationError(
                    f"{ctx.shown_src(t)} changed during the copy; run the copy again"
                )
            if self._unchanged(t, data):
                ctx.file_skipped(t)
                return
            self._put_small(t, data, stat.S_IFREG | e.mode, e.mtime_ns)
            return
        if self._unchanged(t, None):
            ctx.file_skipped(t)
            return
        self._start_multipart(t, part_size)

    def _unchanged(self, t: Target, data: bytes | None) -> bool:
        """Size + ETag for a small file (its MD5), size + `x-amz-meta-mtime` for a large one."""
        if not self.ctx.opts.skip_unchanged:
            return False
        info = self.plan.dst_index.get(t.dst)
        if info is None or info.size != t.entry.size:
            return False
        etag = plain_md5(info.etag)
        if data is not None and etag is not None:
            return hashlib.md5(data).hexdigest() == etag
        head = self.ctx.retry(f"HEAD {t.dst}", lambda: self.store.head(self.bucket, t.dst))
        if head is None or head.size != t.entry.size:
            return False
        return parse_mtime(head.metadata.get("mtime")) == t.entry.mtime_ns

    def _put_small(self, t: Target, data: bytes, mode: int, mtime_ns: int) -> None:
        ctx = self.ctx
        meta = object_meta(mode, mtime_ns, t.entry)
        ctx.throttle(len(data))
        etag = ctx.retry(f"PUT {t.dst}", lambda: self.store.put(self.bucket, t.dst, data, meta))
        got = plain_md5(etag)
        check = "size-only"
        if ctx.opts.verify and got is not None:
            want = hashlib.md5(data).hexdigest()
            if got != want:
                raise VerificationError(
                    f"stored ETag {got} differs from the MD5 {want} of what was sent"
                )
            check = "md5"
        ctx.sent(len(data))
        ctx.file_copied(t, check)

    def _start_multipart(self, t: Target, part_size: int) -> None:
        ctx, e, store, bucket = self.ctx, t.entry, self.store, self.bucket
        fd = ctx.st.open_file(t.src)
        ctx.open_fds.add(fd)
        uploads = ctx.retry(f"LIST UPLOADS {t.dst}", lambda: store.list_uploads(bucket, t.dst))
        upload_id = None
        parts: dict[int, PartInfo] = {}
        # An upload started after the source's last change holds parts of this version (each
        # is still checked by MD5); older ones belong to another version: abort them.
        for u in sorted(uploads, key=_initiated, reverse=True):
            if upload_id is None and u.initiated + 1.0 >= e.mtime_ns / 1e9:
                upload_id = u.upload_id
                continue
            try:
                store.abort_multipart(bucket, t.dst, u.upload_id)
            except Exception as exc:  # best effort: a leftover upload only costs storage
                log.debug("abort of stale upload %s failed: %s", u.upload_id, exc)
        if upload_id is not None:
            uid_ = upload_id
            parts = ctx.retry(f"LIST PARTS {t.dst}", lambda: store.list_parts(bucket, t.dst, uid_))
            log.info("%s: resuming upload %s with %d parts", t.dst, upload_id, len(parts))
        else:
            meta = object_meta(stat.S_IFREG | e.mode, e.mtime_ns, e)
            meta["stowage-partsize"] = str(part_size)
            upload_id = ctx.retry(
                f"CREATE UPLOAD {t.dst}", lambda: store.create_multipart(bucket, t.dst, meta)
            )
        nparts = (e.size + part_size - 1) // part_size
        job = MultipartUpload(self, t, fd, upload_id, part_size, nparts, parts)
        ctx.scheduler.push(job.part_task(n) for n in range(1, nparts + 1))

    def finish_dirs(self) -> None:
        """Empty directories become marker objects (`dir/`), unless one is there already."""
        if not self.ctx.opts.dir_markers:
            return
        ctx = self.ctx
        parents = {os.path.dirname(t.entry.rel) for t in [*self.plan.files, *self.plan.dirs]}
        for d in self.plan.dirs:
            e = d.entry
            key = d.dst + "/"
            if e.rel in parents or key in self.plan.dst_index:
                continue
            meta = object_meta(stat.S_IFDIR | e.mode, e.mtime_ns, e)
            try:
                ctx.retry(f"PUT {key}", bind(self.store.put, self.bucket, key, b"", meta))
                ctx.result.dirs += 1
            except StagingError as exc:
                ctx.record_error(e.rel, str(exc))

    def delete_extraneous(self) -> int:
        return mirror.delete_s3(self.ctx, self.plan, self.store, self.bucket)


@dataclass(eq=False)
class MultipartUpload(SplitFile):
    """One large file going up as a multipart upload; ListParts is its resume journal."""

    up: LocalToS3
    t: Target
    fd: int
    upload_id: str
    part_size: int
    nparts: int
    existing: dict[int, PartInfo]
    etags: dict[int, str] = field(default_factory=dict, init=False)
    md5s: dict[int, bytes] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        super().__init__(self.up.ctx, self.t, self.fd, self.nparts)

    def part_task(self, number: int) -> Callable[[], None]:
        return self.piece(self._upload_part, number)

    def _upload_part(self, number: int) -> None:
        ctx, t, verify = self.ctx, self.t, self.ctx.opts.verify
        offset = (number - 1) * self.part_size
        length = min(self.part_size, t.entry.size - offset)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise VerificationError(
                f"{ctx.shown_src(t)} shrank during the copy; run the copy again"
            )
        old = self.existing.get(number)
        md5 = ""
        raw: bytes | None = None
        # MD5 costs ~1.5 s of CPU per GiB here: only for verification or to judge an old part.
        if verify or old is not None:
            digest = hashlib.md5(data)
            md5, raw = digest.hexdigest(), digest.digest()
            with self.lock:
                self.md5s[number] = raw
        if old is not None and old.size == length and clean_etag(old.etag) == md5:
            with self.lock:
                self.etags[number] = old.etag
            ctx.resumed(length)
            return
        ctx.throttle(length)
        store, bucket, uid = self.up.store, self.up.bucket, self.upload_id
        etag = ctx.retry(
            f"UPLOAD PART {number}/{self.nparts} of {t.dst}",
            lambda: store.upload_part(bucket, t.dst, uid, number, data, raw if verify else None),
        )
        got = clean_etag(etag)
        if verify and MD5_RE.match(got) and got != md5:
            raise VerificationError(f"part {number}: stored ETag {got} differs from MD5 {md5}")
        with self.lock:
            self.etags[number] = etag
        ctx.sent(length)
        ctx.check_stop()

    def finish(self) -> None:
        ctx, t, verify = self.ctx, self.t, self.ctx.opts.verify
        store, bucket = self.up.store, self.up.bucket
        try:
            if self.error is not None:
                raise self.error  # the upload stays for the next run to resume
            st = os.fstat(self.fd)
            if st.st_size != t.entry.size or st.st_mtime_ns != t.entry.mtime_ns:
                raise VerificationError(
                    f"{ctx.shown_src(t)} changed during the copy; run the copy again"
                )
            parts = [(n, self.etags[n]) for n in range(1, self.nparts + 1)]
            numbers = range(1, self.nparts + 1)
            want = multipart_etag(self.md5s[n] for n in numbers) if verify else ""
            etag = ctx.retry(
                f"COMPLETE UPLOAD {t.dst}",
                lambda: store.complete_multipart(bucket, t.dst, self.upload_id, parts),
            )
            got = clean_etag(etag)
            if verify and "-" in got and got != want:
                raise VerificationError(f"multipart ETag {got} differs from expected {want}")
            if verify and got != want:
                # A matching multipart ETag already proves the object is exactly our parts;
                # an opaque one leaves the size to check. Only then: a HEAD right after
                # completion makes `rclone serve s3` hash the whole object, 1.5 s per GiB.
                # Unverified copies trust the acknowledged parts, as unverified PUTs do.
                head = ctx.retry(f"HEAD {t.dst}", lambda: store.head(bucket, t.dst))
                if head is None or head.size != t.entry.size:
                    raise VerificationError(
                        f"stored object has {head.size if head else 'no'} bytes, "
                        f"expected {t.entry.size}"
                    )
            ctx.file_copied(t, "md5" if verify and self.md5s else "size-only")
        except BaseException as exc:
            ctx.file_failed(t, exc)
        finally:
            ctx.close_fd(self.fd)
