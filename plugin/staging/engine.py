"""The copy engine's entry: `copy()` plans a copy between two locations and runs it on a pool
of threads. Its parts, each given one `RunContext` instead of reaching into a copier:

- `planning.py`: list the source, open or index the destination, pair names;
- `scheduling.py`: the worker pool, the scheduler, split files' pieces, retries;
- `tolocal.py` / `chunked.py`: into a local tree (whole files, then large files by chunks);
- `tos3.py`: into S3 (PUTs, multipart uploads, directory markers);
- `verify.py` / `hasher.py`: CRCs per chunk, MD5 and ETags;
- `mirror.py`: deleting what the source does not have (`delete_extraneous`).

Invariants:
- Bytes are written only to `.stowage.NAME.part` in the destination directory, then renamed:
  no partial file is ever visible under its final name.
- Large downloads and local copies record finished chunks in a journal beside the part file;
  large uploads reuse the store's multipart upload (ListParts), checking each part's MD5.
- Every file is verified before the rename: size always, plus the store's full-object CRC
  (CRC64NVME / CRC32C / CRC32, computed per chunk by the workers and combined at the end) where
  it keeps one, else MD5 / multipart ETag wherever the store gives one.
"""

from __future__ import annotations

import logging
import time

from plugin.s3.metadata import format_mtime
from plugin.s3.settings import S3Settings
from plugin.s3.store import MAX_PARTS, MIN_PART_SIZE, NoCredentialsError, ObjectStore
from plugin.staging.context import Direction, Plan, RunContext, Target
from plugin.staging.copyoptions import DEFAULT_CHUNK_SIZE, CopyOptions, MiB, S3Options
from plugin.staging.errors import InvalidLocationError, TransferError
from plugin.staging.localfs import temp_paths
from plugin.staging.locations import LocalLocation, Location, S3Location, parse_location
from plugin.staging.planning import plan
from plugin.staging.progress import CopyResult
from plugin.staging.scheduling import Scheduler, run_workers
from plugin.staging.tolocal import (
    GET_BATCH,
    GET_BATCH_MAX,
    LOCAL_JOBS_MAX,
    LOCAL_LARGE_FILE,
    LocalToLocal,
    S3ToLocal,
)
from plugin.staging.tos3 import LocalToS3
from plugin.staging.verify import multipart_etag, part_size_for

log = logging.getLogger(__name__)

#: Names other modules and tests import from here; the engine's parts live in its modules.
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GET_BATCH",
    "GET_BATCH_MAX",
    "LOCAL_JOBS_MAX",
    "LOCAL_LARGE_FILE",
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "CopyOptions",
    "MiB",
    "S3Options",
    "copy",
    "format_mtime",
    "make_store",
    "multipart_etag",
    "part_size_for",
    "temp_paths",
]


def make_store(s3: S3Options, opts: CopyOptions) -> ObjectStore:
    """The ObjectStore for *s3*: the CRT byte path when available, boto3 otherwise."""
    settings = S3Settings(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        profile=s3.profile,
        max_pool_connections=opts.jobs * 2 + 4,
    )
    if s3.client in ("auto", "crt"):
        try:
            from plugin.s3.crtstore import CrtStore
        except ImportError:
            if s3.client == "crt":
                raise InvalidLocationError(
                    "--s3-client crt needs the awscrt package: pip install awscrt"
                ) from None
        else:
            try:
                return CrtStore(settings, part_size=opts.chunk_size)
            except NoCredentialsError as exc:
                raise TransferError(str(exc)) from None
    from plugin.s3.boto3store import Boto3Store  # boto3 costs ~0.2 s to import

    return Boto3Store(settings)


def copy(
    src: str | Location,
    dst: str | Location,
    options: CopyOptions | None = None,
    *,
    s3: S3Options | None = None,
    store: ObjectStore | None = None,
) -> CopyResult:
    """Copy a file or tree from *src* to *dst* (local paths or `s3://bucket/prefix`).

    A directory source copies its contents into *dst* (like `rsync src/ dst/`). A file source
    is copied to *dst*, or into it if *dst* is an existing directory or ends with '/'.
    Per-file failures are collected in the result; only problems that make the whole copy
    impossible (bad location, missing source) raise a StagingError.
    """
    src_loc = parse_location(src) if isinstance(src, str) else src
    dst_loc = parse_location(dst) if isinstance(dst, str) else dst
    opts = options or CopyOptions()
    if opts.chunk_size < 64 * 1024:
        raise InvalidLocationError("chunk size must be at least 64 KiB")
    endpoint = (s3.endpoint_url or "") if s3 is not None else _endpoint_of(store)
    if (isinstance(src_loc, S3Location) or isinstance(dst_loc, S3Location)) and store is None:
        own = make_store(s3 or S3Options(), opts)
        try:
            return _run(RunContext(src_loc, dst_loc, opts, own, endpoint))
        finally:
            own.close()
    return _run(RunContext(src_loc, dst_loc, opts, store, endpoint))


def _endpoint_of(store: ObjectStore | None) -> str:
    """The endpoint URL of a store the caller made ("" for the SDK's default endpoint,
    which the stores name in words)."""
    endpoint = getattr(store, "endpoint", "") or ""
    return endpoint if "://" in endpoint else ""


class _S3ToS3(Direction):
    def copy_one(self, t: Target) -> None:
        raise InvalidLocationError(
            "S3 to S3 copies are not supported: copy to a local directory first"
        )


def _direction(ctx: RunContext, p: Plan) -> Direction:
    """The strategy for this pair of location kinds: the one place that asks."""
    if isinstance(ctx.dst, LocalLocation):
        if isinstance(ctx.src, LocalLocation):
            return LocalToLocal(ctx, p)
        return S3ToLocal(ctx, p)
    if isinstance(ctx.src, LocalLocation):
        return LocalToS3(ctx, p)
    return _S3ToS3(ctx, p)


def _run(ctx: RunContext) -> CopyResult:
    start = time.monotonic()
    result, tracker = ctx.result, ctx.tracker
    log.info("copy %s -> %s", ctx.src, ctx.dst)
    try:
        try:
            p = plan(ctx)
            way = _direction(ctx, p)
            way.prepare_dirs()
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise InvalidLocationError(
                f"cannot prepare the copy: {exc.strerror or exc}{where}"
            ) from exc
        result.files_total = len(p.files)
        result.bytes_total = sum(t.entry.size for t in p.files)
        tracker.files_total = result.files_total
        tracker.bytes_total = result.bytes_total
        tracker.state = "copying"
        tracker.maybe_emit(force=True)
        ctx.scheduler = Scheduler(way.tasks())
        run_workers(
            ctx.scheduler,
            way.workers(),
            ctx.stopping,
            tracker.maybe_emit,
            ctx.opts.progress_interval,
        )
        if not ctx.stopping():
            way.finish_dirs()
            if ctx.opts.delete_extraneous and not p.single and _complete(ctx):
                ctx.deleted(way.delete_extraneous())
            way.finish()
    finally:
        ctx.cleanup()
        result.elapsed = time.monotonic() - start
    if ctx.cancel.is_set():
        result.state = "cancelled"
    elif ctx.fatal is not None or result.errors:
        result.state = "failed"
    tracker.state = result.state
    tracker.maybe_emit(force=True)
    log.info("%s", result.summary())
    return result


def _complete(ctx: RunContext) -> bool:
    """Every file copied or unchanged and the source listed whole: only then may the mirror
    delete (an error of any kind means the source may hold more than was seen)."""
    r = ctx.result
    if r.errors or r.files_failed or ctx.fatal is not None:
        log.warning("%s: not deleting extraneous files: the copy had errors", ctx.dst)
        return False
    return r.files_copied + r.files_skipped == r.files_total
