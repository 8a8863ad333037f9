"""The copy engine: plans a copy between two locations and runs it on a pool of threads.

Shape (s3ql's ParallelPipeline): the source is listed up front (totals for progress), then
`jobs` workers pull work from one scheduler. A large file becomes one task per chunk; workers
prefer pending chunks over starting new files, so few large files are open at a time and memory
stays at about `jobs` x one buffer (x one chunk for uploads) whatever the data size.

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

import contextlib
import hashlib
import logging
import os
import random
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from plugin.confined import Tree, UnsafePathError
from plugin.staging import crc, localfs
from plugin.staging.errors import (
    CopyCancelledError,
    InvalidLocationError,
    SourceNotFoundError,
    StagingError,
    TransferError,
    VerificationError,
)
from plugin.staging.journal import ChunkJournal
from plugin.staging.localfs import Entry
from plugin.staging.locations import (
    LocalLocation,
    Location,
    S3Location,
    parse_location,
    safe_relpath,
)
from plugin.staging.objmeta import parse_mtime, sanitize_object_meta
from plugin.staging.progress import (
    CopyResult,
    FileError,
    ProgressCallback,
    ProgressTracker,
    TokenBucket,
)
from plugin.staging.store import (
    STREAM_BUFSIZE,
    Checksum,
    NoCredentialsError,
    ObjectInfo,
    ObjectStore,
    UploadInfo,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 8 * MiB
#: S3 refuses multipart parts below 5 MiB (except the last) and uploads above 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Upper bound on workers for local-to-local copies (see _run_workers).
LOCAL_JOBS_MAX = 4
#: Mean file size from which a local tree counts as data-heavy (a worker per core).
LOCAL_LARGE_FILE = 256 * 1024
_MD5_RE = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


@dataclass(frozen=True)
class CopyOptions:
    """Knobs of one copy. Defaults suit a 2-core machine next to a loopback or LAN S3."""

    #: Worker threads (files and chunks in flight).
    jobs: int = 8
    #: Size of download chunks and upload parts; larger files are copied chunk by chunk.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Bytes per second over all workers; None = unlimited.
    bwlimit: float | None = None
    #: Attempts after the first for a request failing with a transient error.
    retries: int = 5
    #: First retry delay in seconds, doubled per attempt (with jitter), capped at 10 s.
    retry_delay: float = 0.25
    #: Check MD5/ETag as well as size (size is always checked).
    verify: bool = True
    #: Skip files whose destination already matches (size + mtime, or size + ETag).
    skip_unchanged: bool = True
    #: Owners recorded in the source. None (default): a local source's real owners when
    #: running as root (like `cp -a`), but never the uid/gid metadata of S3 objects, which
    #: whoever wrote the bucket chose; True: those too; False: never.
    preserve_owner: bool | None = None
    #: (uid, gid) given to every file and directory written locally (a staged volume's
    #: uid=/gid= options), instead of any owner from the source; -1 keeps that id.
    owner: tuple[int, int] | None = None
    #: One syncfs() of the destination at the end, instead of an fsync per file.
    fsync: bool = False
    #: Store empty directories in S3 as `dir/` marker objects (s3fs / console convention).
    dir_markers: bool = True
    progress: ProgressCallback | None = None
    progress_interval: float = 0.5
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Byte path: "crt" (awscrt, fast), "boto3" (portable), "auto" (crt when installed).
    client: str = "auto"


def make_store(s3: S3Options, opts: CopyOptions) -> ObjectStore:
    """The ObjectStore for *s3*: the CRT byte path when available, boto3 otherwise."""
    conns = opts.jobs * 2 + 4
    if s3.client in ("auto", "crt"):
        try:
            from plugin.staging.crtstore import CrtStore
        except ImportError:
            if s3.client == "crt":
                raise InvalidLocationError(
                    "--s3-client crt needs the awscrt package: pip install awscrt"
                ) from None
        else:
            try:
                return CrtStore(
                    s3.endpoint_url, s3.region, s3.profile, conns, part_size=opts.chunk_size
                )
            except NoCredentialsError as exc:
                raise TransferError(str(exc)) from None
    from plugin.staging.boto3store import Boto3Store  # boto3 costs ~0.2 s to import

    return Boto3Store(s3.endpoint_url, s3.region, s3.profile, conns)


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
    if (isinstance(src_loc, S3Location) or isinstance(dst_loc, S3Location)) and store is None:
        own = make_store(s3 or S3Options(), opts)
        try:
            return _Copier(src_loc, dst_loc, opts, own).run()
        finally:
            own.close()
    return _Copier(src_loc, dst_loc, opts, store).run()


def format_mtime(ns: int) -> str:
    """Object metadata mtime as seconds with nanoseconds (s3fs reads the integer part)."""
    sec, frac = divmod(ns, 1_000_000_000)
    return f"{sec}.{frac:09d}"


#: Small S3 objects bound for a local tree are fetched this many per task, pipelined: on a
#: loopback server 10,000 x 16 KiB took 7.3 s one request per file, with batches 2.9 s.
GET_BATCH = 32
#: Objects up to this size are batched; a batch holds its bodies in memory (32 MiB at most).
GET_BATCH_MAX = 1 << 20


def part_size_for(size: int, chunk_size: int) -> int:
    """Multipart part size: the chunk size, at least 5 MiB, grown to stay within 10,000 parts."""
    part = max(chunk_size, MIN_PART_SIZE)
    while (size + part - 1) // part > MAX_PARTS:
        part *= 2
    return part


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    digests = list(part_md5s)
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _clean_etag(etag: str) -> str:
    return etag.strip().strip('"').lower()


def temp_paths(final: str) -> tuple[str, str]:
    """Deterministic part/journal names beside *final*, so a rerun finds them again."""
    head, name = os.path.split(final)
    if len(os.fsencode(name)) > 200:  # keep within NAME_MAX with prefix and suffix
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:40]
    base = os.path.join(head, localfs.TEMP_PREFIX + name)
    return base + ".part", base + ".journal"


class _AbortError(Exception):
    """Internal: stop this file quietly because the whole copy stops."""


class _Scheduler:
    """Hands out work: pending chunks of files already started first, then new files.

    A worker with nothing to do waits while other tasks are running, because a running task
    may be a large file about to push its chunks; only when nothing is queued, the file list
    is exhausted and no task runs is the work over.
    """

    def __init__(self, tasks: Iterable[Callable[[], None]]) -> None:
        self._cond = threading.Condition()
        self._chunks: deque[Callable[[], None]] = deque()
        self._tasks = iter(tasks)
        self._exhausted = False
        self._active = 0

    def push(self, chunk_tasks: Iterable[Callable[[], None]]) -> None:
        with self._cond:
            self._chunks.extend(chunk_tasks)
            self._cond.notify_all()

    def next(self, stopping: Callable[[], bool]) -> Callable[[], None] | None:
        """The next task (the caller must call done() after it), or None when all is done."""
        with self._cond:
            while not stopping():
                task: Callable[[], None] | None = None
                if self._chunks:
                    task = self._chunks.popleft()
                elif not self._exhausted:
                    task = next(self._tasks, None)
                    self._exhausted = task is None
                if task is not None:
                    self._active += 1
                    return task
                if self._active == 0:
                    self._cond.notify_all()
                    return None
                self._cond.wait(0.2)
            return None

    def done(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()


class _Hasher:
    """Checksum of a part file being filled chunk by chunk in any order, computed while the
    chunks land so verification costs no pass at the end.

    - plain MD5 ETag: one thread hashes the contiguous finished prefix in order (MD5 is
      sequential), overlapped with the chunks still downloading. Downloads may run at most
      *lead* chunks ahead of it (`wait_for_room`): unchecked, they finish first while the
      hasher, starved of CPU by them and the server, has done an eighth of the file, and it
      then hashes the rest alone on one core (1 GiB on 2 cores: 2.6 s, with the lead 2.3 s);
    - multipart ETag (`md5-of-part-md5s-N`): parts are independent, so the worker that
      finishes a part's last chunk hashes that part at once, in parallel with the others.

    Reads are preads into a small reused buffer (hashlib and pread both release the GIL), not
    an mmap: a part file truncated behind our back must fail verification, not SIGBUS the
    daemon that runs the copy. A short read leaves the result None, which never matches.
    """

    _BUFFER = 1 << 20

    def __init__(
        self, fd: int, size: int, chunk_size: int, part_size: int | None, lead: int | None = None
    ) -> None:
        self._fd = fd
        self._size = size
        self._chunk = chunk_size
        self._nchunks = max(1, (size + chunk_size - 1) // chunk_size)
        self._part_size = part_size
        self._done = [False] * self._nchunks
        self._lead = self._nchunks if lead is None else max(1, lead)
        self._hashed = 0  # chunks hashed in order (plain MD5)
        self._over = False  # the in-order hash ended (result, short read or stop)
        self._cond = threading.Condition()
        self._stopped = False
        self._busy = 0  # part hashes in flight; stop() waits for them (the fd closes after)
        self._short_read = False
        self._result: str | None = None
        self._thread: threading.Thread | None = None
        self._parts: list[bytes | None] = []
        self._parts_left: list[int] = []
        if part_size is None:
            self._thread = threading.Thread(target=self._run, name="stowage-hash", daemon=True)
            self._thread.start()
        else:
            nparts = max(1, (size + part_size - 1) // part_size)
            self._parts = [None] * nparts
            self._parts_left = [len(self._chunks_of(p)) for p in range(nparts)]

    def _chunks_of(self, part: int) -> range:
        assert self._part_size is not None
        start = part * self._part_size
        end = min(start + self._part_size, self._size)
        return range(start // self._chunk, max(start // self._chunk + 1, -(-end // self._chunk)))

    def mark(self, index: int) -> None:
        """Chunk *index* is written; hash whatever that completes."""
        if self._part_size is None:
            with self._cond:
                self._done[index] = True
                self._cond.notify_all()
            return
        first = index * self._chunk // self._part_size
        last = (min((index + 1) * self._chunk, self._size) - 1) // self._part_size
        for p in range(first, last + 1):
            with self._cond:
                self._parts_left[p] -= 1
                ready = self._parts_left[p] == 0 and not self._stopped
                if ready:
                    self._busy += 1
            if not ready:
                continue
            ok = False
            try:
                start = p * self._part_size
                end = min(start + self._part_size, self._size)
                md5 = hashlib.md5()
                ok = self._update(md5, start, end, bytearray(self._BUFFER))
            finally:
                with self._cond:
                    self._busy -= 1
                    if ok:
                        self._parts[p] = md5.digest()
                    else:
                        self._short_read = True
                    self._cond.notify_all()

    def wait_for_room(self, index: int, stopping: Callable[[], bool]) -> None:
        """Block a download of chunk *index* while it would run more than the lead ahead of
        the in-order hash. No deadlock: the lowest chunk not yet hashed is always in room."""
        if self._thread is None:
            return
        with self._cond:
            while index >= self._hashed + self._lead and not self._over and not stopping():
                self._cond.wait(0.2)

    def _update(self, md5: Any, start: int, end: int, buf: bytearray) -> bool:
        """Feed bytes [start, end) of the part file to *md5*; False on a short read."""
        view = memoryview(buf)
        pos = start
        while pos < end:
            n = os.preadv(self._fd, [view[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                log.warning("part file shrank while being verified (at byte %d of %d)", pos, end)
                return False
            md5.update(view[:n])
            pos += n
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            while self._busy:
                self._cond.wait()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
        elif not self._short_read and self._parts and all(d is not None for d in self._parts):
            self._result = multipart_etag(d for d in self._parts if d is not None)
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._hash_in_order()
        finally:
            with self._cond:
                self._over = True  # room for every waiting download: nothing will hash now
                self._cond.notify_all()

    def _hash_in_order(self) -> str | None:
        whole = hashlib.md5()
        buf = bytearray(self._BUFFER)
        for i in range(self._nchunks):
            with self._cond:
                while not self._done[i] and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return None
            start, end = i * self._chunk, min((i + 1) * self._chunk, self._size)
            if not self._update(whole, start, end, buf):
                return None
            with self._cond:
                self._hashed = i + 1
                self._cond.notify_all()
        return whole.hexdigest()


@dataclass
class _Target:
    """Where one source entry goes."""

    entry: Entry
    src: str  # local path or S3 key
    dst: str  # local path or S3 key


class _Copier:
    def __init__(
        self, src: Location, dst: Location, opts: CopyOptions, store: ObjectStore | None
    ) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.store = store
        self.cancel = opts.cancel or threading.Event()
        self._abort = threading.Event()
        self._fatal: str | None = None
        self.tracker = ProgressTracker(opts.progress, opts.progress_interval)
        self.result = CopyResult()
        self._lock = threading.Lock()
        self._bucket = TokenBucket(opts.bwlimit) if opts.bwlimit else None
        self._dst_index: dict[str, ObjectInfo] = {}
        self._open_fds: set[int] = set()
        self._hashers: set[_Hasher] = set()
        self._journals: set[ChunkJournal] = set()
        #: Destination directories known to exist / created by this run.
        self._ready_dirs: set[str] = set()
        self._fresh_dirs: set[str] = set()
        self._ids = (os.geteuid(), os.getegid())
        self._single = False
        self._reflink_ok = True
        self._scheduler = _Scheduler(())
        owner = opts.preserve_owner
        self._chown = (os.geteuid() == 0) if owner is None else owner
        self._chown_s3_meta = owner is True
        #: The local side(s), opened once: every name beneath them is reached fd-relative.
        self._st: Tree | None = None
        self._dt: Tree | None = None

    # ------------------------------------------------------------------ driver

    def run(self) -> CopyResult:
        start = time.monotonic()
        log.info("copy %s -> %s", self.src, self.dst)
        try:
            try:
                targets, dirs = self._plan()
                self._make_dirs(dirs)
            except OSError as exc:
                where = f": {exc.filename}" if exc.filename else ""
                raise InvalidLocationError(
                    f"cannot prepare the copy: {exc.strerror or exc}{where}"
                ) from exc
            self.result.files_total = len(targets)
            self.result.bytes_total = sum(t.entry.size for t in targets)
            self.tracker.files_total = self.result.files_total
            self.tracker.bytes_total = self.result.bytes_total
            self.tracker.state = "copying"
            self.tracker.maybe_emit(force=True)
            self._scheduler = _Scheduler(self._tasks(targets))
            self._run_workers()
            if not self._stopping():
                self._finish_dirs(dirs, targets)
                if self.opts.fsync and isinstance(self.dst, LocalLocation):
                    self._syncfs()
        finally:
            self._cleanup()
            self.result.elapsed = time.monotonic() - start
        if self.cancel.is_set():
            self.result.state = "cancelled"
        elif self._fatal is not None or self.result.errors:
            self.result.state = "failed"
        self.tracker.state = self.result.state
        self.tracker.maybe_emit(force=True)
        log.info("%s", self.result.summary())
        return self.result

    def _run_workers(self) -> None:
        n = max(1, self.opts.jobs)
        if isinstance(self.src, LocalLocation) and isinstance(self.dst, LocalLocation):
            # Local copies are syscall-bound. Many small files: threads beyond the cores left
            # to the kernel only add GIL and inode-lock contention (2 cores, 10,000 x 4 KiB:
            # 1 thread 0.45 s, 2 threads 1.26 s). Large files: the kernel's copy is the work,
            # and a thread per core runs two of them at once (1,000 x 1 MiB: 2 threads 0.32 s,
            # 1 thread 0.43 s).
            cores = os.cpu_count() or 1
            files = max(1, self.result.files_total)
            if self.result.bytes_total // files < LOCAL_LARGE_FILE:
                cores = max(1, cores - 1)
            n = min(n, LOCAL_JOBS_MAX, cores)
        threads = [
            threading.Thread(target=self._worker, name=f"stowage-copy-{i}", daemon=True)
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(self.opts.progress_interval)
                self.tracker.maybe_emit()

    def _worker(self) -> None:
        while True:
            task = self._scheduler.next(self._stopping)
            if task is None:
                return
            try:
                task()
            finally:
                self._scheduler.done()

    def _stopping(self) -> bool:
        return self.cancel.is_set() or self._abort.is_set()

    def _cleanup(self) -> None:
        for h in list(self._hashers):
            h.stop()
        for j in list(self._journals):
            j.close()
        for fd in list(self._open_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open_fds.clear()
        for tree in (self._st, self._dt):
            if tree is not None:
                tree.close()

    # ------------------------------------------------------------------ planning

    def _plan(self) -> tuple[list[_Target], list[_Target]]:
        """List the source; returns (files and symlinks, directories) with their destinations."""
        entries, single = self._list_source()
        if single is not None:
            self._single = True
            dst = self._single_destination(single)
            return [_Target(entries[0], single, dst)], []
        if isinstance(self.dst, S3Location):
            prefix = self.dst.dir_prefix
            self._index_destination(prefix)
        else:
            existed = os.path.isdir(self.dst.path)
            self._dt = Tree.at(self.dst.path, create=True, no_symlinks=self.dst.no_symlinks)
            if not existed:
                self._fresh_dirs.add("")
        files: list[_Target] = []
        dirs: list[_Target] = []
        for e in entries:
            t = _Target(e, self._src_name(e.rel), self._dst_name(e.rel))
            (dirs if e.kind == "dir" else files).append(t)
        dirs.sort(key=lambda t: t.entry.rel)
        return files, dirs

    def _list_source(self) -> tuple[list[Entry], str | None]:
        src = self.src
        if isinstance(src, LocalLocation):
            try:
                if src.no_symlinks:
                    self._st = Tree.at(src.path, no_symlinks=True)
                    st = os.fstat(self._st.fd)
                else:
                    st = os.stat(src.path)
            except FileNotFoundError:
                raise SourceNotFoundError(f"source {src.path} does not exist") from None
            except UnsafePathError:
                raise SourceNotFoundError(
                    f"source {src.path} now has a symlink in its path; it is not followed"
                ) from None
            except OSError as exc:
                raise SourceNotFoundError(f"cannot read source {src.path}: {exc}") from exc
            if not stat.S_ISDIR(st.st_mode):
                # A file named on the command line is followed once, like `cp`.
                head, base = os.path.split(os.path.realpath(src.path))
                self._st = Tree.at(head)
                entry = localfs.entry_from_stat(base, os.stat(base, dir_fd=self._st.fd), str)
                if entry is None or entry.kind != "file":
                    raise SourceNotFoundError(f"source {src.path} is not a file or directory")
                return [entry], base
            if self._st is None:
                self._st = Tree.at(src.path)
            entries = list(localfs.walk(self._st, self._skipped))
            return entries, None
        assert self.store is not None
        store = self.store
        if src.key and not src.trailing_slash:
            info = self._retry(f"HEAD {src}", lambda: store.head(src.bucket, src.key))
            if info is not None:
                ns = parse_mtime(info.metadata.get("mtime"))
                mtime_ns = ns if ns is not None else int(info.last_modified * 1e9)
                return [Entry("", "file", size=info.size, mtime_ns=mtime_ns, etag=info.etag)], (
                    src.key
                )
        prefix = src.dir_prefix
        entries = []
        seen_dirs: set[str] = set()
        objects = self._retry(f"LIST {src}", lambda: list(store.list_objects(src.bucket, prefix)))
        for obj in objects:
            rel = obj.key[len(prefix) :]
            if not rel:
                continue
            is_dir = rel.endswith("/")
            rel = rel.rstrip("/")
            if not safe_relpath(rel):
                self._skipped(obj.key, "key is not a safe relative path; not copied")
                continue
            parts = rel.split("/")
            for i in range(1, len(parts) + (1 if is_dir else 0)):
                d = "/".join(parts[:i])
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    entries.append(Entry(d, "dir", mode=0o755))
            if not is_dir:
                mtime_ns = int(obj.last_modified * 1e9)
                entries.append(Entry(rel, "file", size=obj.size, mtime_ns=mtime_ns, etag=obj.etag))
        if not entries:
            raise SourceNotFoundError(f"no objects under {src}: check the bucket and prefix")
        return entries, None

    def _single_destination(self, src_name: str) -> str:
        base = os.path.basename(src_name.rstrip("/"))
        dst = self.dst
        if isinstance(dst, LocalLocation):
            # The path the user gave is trusted; the name written in it is not followed.
            if dst.trailing_slash or os.path.isdir(dst.path):
                self._dt = Tree.at(dst.path, create=True)
                return base
            head, name = os.path.split(dst.path)
            self._dt = Tree.at(head, create=True)
            return name
        key = dst.dir_prefix + base if dst.trailing_slash else dst.key
        store = self.store
        assert store is not None
        info = self._retry(f"HEAD {dst}", lambda: store.head(dst.bucket, key))
        if info is not None:
            self._dst_index[key] = info
        return key

    def _index_destination(self, prefix: str) -> None:
        assert isinstance(self.dst, S3Location) and self.store is not None
        bucket, store = self.dst.bucket, self.store
        objects = self._retry(f"LIST {self.dst}", lambda: list(store.list_objects(bucket, prefix)))
        for obj in objects:
            self._dst_index[obj.key] = obj

    def _src_name(self, rel: str) -> str:
        """A local source's name relative to its tree, or an S3 key."""
        if isinstance(self.src, LocalLocation):
            return rel
        return self.src.dir_prefix + rel

    def _dst_name(self, rel: str) -> str:
        if isinstance(self.dst, LocalLocation):
            return rel
        return self.dst.dir_prefix + rel

    @property
    def dt(self) -> Tree:
        """The local destination tree (only called on local-destination paths)."""
        assert self._dt is not None
        return self._dt

    @property
    def st(self) -> Tree:
        assert self._st is not None
        return self._st

    def shown_src(self, t: _Target) -> str:
        return self.st.display(t.src) if isinstance(self.src, LocalLocation) else t.src

    def shown_dst(self, t: _Target) -> str:
        return self.dt.display(t.dst) if isinstance(self.dst, LocalLocation) else t.dst

    def _skipped(self, rel: str, why: str) -> None:
        self._record_error(rel, why)

    # ------------------------------------------------------------------ bookkeeping

    def _record_error(self, rel: str, message: str) -> None:
        log.warning("%s: %s", rel or str(self.src), message)
        with self._lock:
            self.result.errors.append(FileError(rel or str(self.src), message))
        self.tracker.error(f"{rel}: {message}")

    def _file_failed(self, t: _Target, exc: BaseException) -> None:
        if isinstance(exc, CopyCancelledError | _AbortError):
            return
        if isinstance(exc, TransferError) and exc.fatal:
            with self._lock:
                first = self._fatal is None
                if first:
                    self._fatal = str(exc)
            self._abort.set()
            if not first:
                return
        if isinstance(exc, OSError):
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        else:
            message = str(exc)
        with self._lock:
            self.result.files_failed += 1
        self._record_error(t.entry.rel or t.src, message)
        self.tracker.file_done()

    def _file_copied(self, t: _Target, check: str | None = None) -> None:
        """*check*: what verified the file ("crc64nvme", "md5", "size-only", ...)."""
        with self._lock:
            self.result.files_copied += 1
            if t.entry.kind == "symlink":
                self.result.symlinks += 1
            if check is not None:
                self.result.checks[check] = self.result.checks.get(check, 0) + 1
        if check is not None:
            self.tracker.add_check(check)
        self.tracker.file_done()

    def _file_skipped(self, t: _Target) -> None:
        with self._lock:
            self.result.files_skipped += 1
            self.result.bytes_skipped += t.entry.size
        self.tracker.add_bytes(t.entry.size)
        self.tracker.file_done()

    def _moved(self, n: int) -> None:
        """Account *n* bytes moved by this run; applies the bandwidth limit and cancellation."""
        with self._lock:
            self.result.bytes_copied += n
        self.tracker.add_bytes(n)
        if self._bucket is not None:
            self._bucket.take(n, self.cancel)
        self._check_stop()

    def _resumed(self, n: int) -> None:
        with self._lock:
            self.result.bytes_resumed += n
        self.tracker.add_bytes(n)

    def _check_stop(self) -> None:
        if self.cancel.is_set():
            raise CopyCancelledError()
        if self._abort.is_set():
            raise _AbortError()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run *fn*, retrying transient S3 failures with exponential backoff and jitter."""
        assert self.store is not None
        attempt = 0
        while True:
            self._check_stop()
            try:
                return fn()
            except (StagingError, _AbortError):
                raise
            except Exception as exc:
                transient = self.store.is_transient(exc)
                if not transient or attempt >= self.opts.retries:
                    raise self._transfer_error(what, exc, attempt + 1, transient) from exc
                delay = min(self.opts.retry_delay * 2**attempt, 10.0) * (0.5 + random.random())
                attempt += 1
                log.info(
                    "%s failed (%s); retry %d/%d in %.1fs",
                    what,
                    exc,
                    attempt,
                    self.opts.retries,
                    delay,
                )
                if self.cancel.wait(delay):
                    raise CopyCancelledError() from exc

    def _transfer_error(
        self, what: str, exc: BaseException, attempts: int, transient: bool
    ) -> TransferError:
        assert self.store is not None
        unreachable = self.store.is_unreachable(exc)
        if unreachable:
            hint = (
                f"cannot reach the S3 endpoint {self.store.endpoint}: check that it is up and "
                "that --endpoint is right; finished chunks are kept and a rerun resumes"
            )
        elif transient:
            hint = "the S3 endpoint kept failing; rerun later to resume"
        else:
            hint = "check the bucket name, the prefix and the credentials' permissions"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return TransferError(f"{what} failed{tries}: {exc} ({hint})", fatal=unreachable)

    # ------------------------------------------------------------------ dispatch

    def _tasks(self, targets: list[_Target]) -> Iterator[Callable[[], None]]:
        """A task per file; small S3 objects bound for a local tree in batches of GET_BATCH,
        fetched in one pipelined exchange (per-request overhead is most of their cost)."""
        batchable = isinstance(self.src, S3Location) and isinstance(self.dst, LocalLocation)
        largest = min(GET_BATCH_MAX, self.opts.chunk_size)  # larger ones go in chunks
        batch: list[_Target] = []
        for t in targets:
            if batchable and t.entry.size <= largest:
                batch.append(t)
                if len(batch) == GET_BATCH:
                    yield self._batch_task(batch)
                    batch = []
            else:
                yield self._task_for(t)
        if batch:
            yield self._batch_task(batch)

    def _batch_task(self, batch: list[_Target]) -> Callable[[], None]:
        def task() -> None:
            assert isinstance(self.src, S3Location) and self.store is not None
            todo: list[_Target] = []
            for t in batch:
                try:
                    self._check_stop()
                    if self._local_unchanged(t):
                        self._file_skipped(t)
                    else:
                        todo.append(t)
                except Exception as exc:
                    self._file_failed(t, exc)
            if not todo:
                return
            try:
                self._check_stop()
                fetched = self.store.get_many(self.src.bucket, [t.src for t in todo], GET_BATCH_MAX)
            except Exception as exc:  # each file's own GET retries and reports
                log.debug("batched GET failed, fetching one by one: %s", exc)
                fetched = [None] * len(todo)
            for t, got in zip(todo, fetched, strict=True):
                try:
                    self._check_stop()
                    self._s3_to_local(t, prefetched=got, checked=True)
                except Exception as exc:
                    self._file_failed(t, exc)

        return task

    def _task_for(self, t: _Target) -> Callable[[], None]:
        def task() -> None:
            try:
                self._check_stop()
                self._copy_one(t)
            except Exception as exc:
                self._file_failed(t, exc)

        return task

    def _copy_one(self, t: _Target) -> None:
        src_s3 = isinstance(self.src, S3Location)
        dst_s3 = isinstance(self.dst, S3Location)
        if not src_s3 and not dst_s3:
            self._local_to_local(t)
        elif src_s3 and not dst_s3:
            self._s3_to_local(t)
        elif dst_s3 and not src_s3:
            self._local_to_s3(t)
        else:
            raise InvalidLocationError(
                "S3 to S3 copies are not supported: copy to a local directory first"
            )

    # ------------------------------------------------------------------ local destination

    def _prepare_parent(self, rel: str) -> None:
        """The parent directories of *rel*, created where missing; a symlink planted where a
        directory belongs is replaced by a directory, never followed."""
        parent = os.path.dirname(rel)
        if parent and parent not in self._ready_dirs:
            self.dt.makedirs(parent)

    def _local_unchanged(self, t: _Target) -> bool:
        if not self.opts.skip_unchanged or os.path.dirname(t.dst) in self._fresh_dirs:
            return False
        try:
            st = self.dt.lstat(t.dst)
        except OSError:
            return False
        e = t.entry
        if e.kind == "symlink":
            return stat.S_ISLNK(st.st_mode) and self.dt.readlink(t.dst) == e.target
        if stat.S_ISLNK(st.st_mode) and isinstance(self.src, S3Location):
            # A symlink stored s3fs-style: the object's body is the target.
            target = os.fsencode(self.dt.readlink(t.dst))
            return len(target) == e.size and hashlib.md5(target).hexdigest() == _clean_etag(e.etag)
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
            return False
        if isinstance(self.src, LocalLocation):
            return st.st_mtime_ns == e.mtime_ns
        # From S3: a small object's ETag is its MD5 (cheap to check locally); a large one's
        # mtime metadata was copied to the file by the previous run.
        etag = _plain_md5(e.etag)
        if e.size <= self.opts.chunk_size and etag is not None:
            try:
                return _md5_fd(self.dt.open_file(t.dst)) == etag
            except OSError:
                return False
        assert isinstance(self.src, S3Location) and self.store is not None
        store, bucket = self.store, self.src.bucket
        info = self._retry(f"HEAD {t.src}", lambda: store.head(bucket, t.src))
        if info is None or info.size != e.size:
            return False
        ns = parse_mtime(info.metadata.get("mtime"))
        want = ns if ns is not None else int(info.last_modified * 1e9)
        return abs(st.st_mtime_ns - want) < 1000  # float-parsing slack

    def _owner_for(self, uid: int, gid: int, from_s3: bool) -> tuple[int, int] | None:
        """The owner to give a new local file, or None to leave it as created (root)."""
        if self.opts.owner is not None:
            return self.opts.owner
        chown = self._chown_s3_meta if from_s3 else self._chown
        if chown and uid >= 0 and gid >= 0 and (uid, gid) != self._ids:
            return uid, gid
        return None

    def _apply_meta(
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
        owner = self._owner_for(uid, gid, from_s3)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode & 0o777)
        os.utime(fd, ns=(atime_ns or mtime_ns, mtime_ns))

    def _make_symlink(self, target: str, dst: str, e: Entry, *, from_s3: bool = False) -> None:
        part, _ = temp_paths(dst)
        self.dt.unlink(part, missing_ok=True)
        self.dt.symlink(target, part)
        owner = self._owner_for(e.uid, e.gid, from_s3)
        if owner is not None:
            self.dt.lchown(part, *owner)
        if e.mtime_ns:
            self.dt.utime(part, (e.atime_ns or e.mtime_ns, e.mtime_ns))
        self._rename(part, dst)

    def _reflink(self, src_fd: int, dst_fd: int) -> bool:
        """FICLONE until the destination filesystem first refuses it; then never again in this
        copy (saves an fstat + ioctl per file on ext4, which has no reflinks)."""
        if not self._reflink_ok:
            return False
        if localfs.try_reflink(src_fd, dst_fd):
            return True
        self._reflink_ok = False
        return False

    def _rename(self, part: str, final: str) -> None:
        """Move a finished part file (or link) to its name; whatever entry held the name,
        a planted symlink included, is replaced, not followed."""
        try:
            self.dt.rename(part, final)
        except IsADirectoryError:
            shown = self.dt.display(final)
            raise OSError(21, f"destination {shown} is a directory, the source is a file") from None

    def _local_to_local(self, t: _Target) -> None:
        e = t.entry
        if self._local_unchanged(t):
            self._file_skipped(t)
            return
        self._prepare_parent(t.dst)
        if e.kind == "symlink":
            self._make_symlink(e.target, t.dst, e)
            self.tracker.add_bytes(e.size)
            self._file_copied(t)
            return
        src_fd = self.st.open_file(t.src)
        try:
            st = os.fstat(src_fd)
            if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
                raise VerificationError(
                    f"{self.shown_src(t)} changed while the copy was being planned; "
                    "run the copy again"
                )
            if e.size > self.opts.chunk_size:
                self._start_chunked(t, src_fd=src_fd)
                src_fd = -1  # owned by the chunked copy now
                return
            part, journal = temp_paths(t.dst)
            dst_fd = self._new_part(part, journal)
            try:
                copied = [0]

                def step(n: int) -> None:
                    copied[0] += n
                    self._moved(n)

                if e.size and not self._reflink(src_fd, dst_fd):
                    localfs.copy_range(src_fd, dst_fd, 0, e.size, step, sparse=False)
                elif e.size:
                    step(e.size)
                if copied[0] != e.size:
                    raise VerificationError(f"copied {copied[0]} bytes of {e.size}; not renamed")
                self._apply_meta(dst_fd, e.mode, e.atime_ns, e.mtime_ns, e.uid, e.gid)
            except BaseException:
                self._drop_part(part)
                raise
            finally:
                os.close(dst_fd)
            self._rename(part, t.dst)
            self._file_copied(t, "size-only")
        finally:
            if src_fd >= 0:
                os.close(src_fd)

    def _s3_to_local(
        self,
        t: _Target,
        *,
        prefetched: tuple[ObjectInfo, bytes] | None = None,
        checked: bool = False,
    ) -> None:
        """*prefetched*: the object's info and body, fetched by a batch; *checked*: the
        batch already found the local file out of date."""
        assert isinstance(self.src, S3Location) and self.store is not None
        e = t.entry
        if not checked and self._local_unchanged(t):
            self._file_skipped(t)
            return
        self._prepare_parent(t.dst)
        if e.size > self.opts.chunk_size:
            self._start_chunked(t, src_fd=-1)
            return
        store, bucket = self.store, self.src.bucket
        buf: bytes | bytearray
        if prefetched is not None:
            info, buf = prefetched
            self._moved(len(buf))
        else:
            buf = bytearray()

            def sink(offset: int, data: memoryview, buf: bytearray = buf) -> None:
                del buf[offset:]  # a retried GET starts again from offset 0
                buf.extend(data)
                self._moved(len(data))

            info = self._retry(f"GET {t.src}", lambda: store.get(bucket, t.src, sink))
        if len(buf) != info.size:
            raise VerificationError(f"got {len(buf)} bytes of {info.size}; not renamed")
        check = self._verify_whole(t, info, buf) if self.opts.verify else "size-only"
        mode, mtime_ns, uid, gid = self._meta_from_object(info, t)
        if stat.S_ISLNK(mode):
            self._make_symlink(
                os.fsdecode(bytes(buf)),
                t.dst,
                Entry(e.rel, "symlink", mtime_ns=mtime_ns, uid=uid, gid=gid),
                from_s3=True,
            )
            self._file_copied(t, check)
            return
        part, journal = temp_paths(t.dst)
        fd = self._new_part(part, journal)
        try:
            view = memoryview(buf)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            self._apply_meta(fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
        except BaseException:
            self._drop_part(part)
            raise
        finally:
            os.close(fd)
        self._rename(part, t.dst)
        self._file_copied(t, check)

    def _verify_whole(self, t: _Target, info: ObjectInfo, buf: bytes | bytearray) -> str:
        """Check a whole object's body against the CRC its GET returned, else its MD5 ETag;
        returns the check made."""
        usable = _usable_crc(info)
        if usable is not None and usable[1] is None:
            cs = usable[0]
            fn = crc.compute_fn(cs.algorithm)
            assert fn is not None
            got = crc.encode(cs.algorithm, fn(buf, 0))
            if got != _crc_value(cs):
                raise VerificationError(
                    f"{cs.algorithm} {got} does not match the store's {cs.value}; not renamed"
                )
            return cs.algorithm
        etag = _plain_md5(info.etag)
        if etag is None:
            return "size-only"
        got = hashlib.md5(buf).hexdigest()
        if got != etag:
            raise VerificationError(f"MD5 {got} does not match ETag {etag}; not renamed")
        return "md5"

    def _crc_check_for(self, t: _Target, info: ObjectInfo, chunk: int) -> _CrcCheck | None:
        """The CRC verification of a chunked download, when the store keeps a CRC we can
        rebuild from per-chunk CRCs: a full-object one, or a composite one (CRC of the part
        CRCs) whose part size is known."""
        usable = _usable_crc(info)
        if usable is None:
            if info.checksum is not None:
                log.info(
                    "%s: the store's %s (type %s) is not usable here; checking the ETag",
                    t.src,
                    info.checksum.algorithm,
                    info.checksum.type or "not given",
                )
            return None
        cs, nparts = usable
        part_size = None
        if nparts is not None:
            part_size = self._guess_part_size(info, nparts)
            if part_size is None:
                log.info("%s: part size of the composite %s unknown", t.src, cs.algorithm)
                return None
        return _CrcCheck(cs, info.size, chunk, part_size)

    def _new_part(self, part: str, journal: str) -> int:
        """The part file of a file copied whole. One already there is a chunked copy's that
        an earlier run left (interrupted, or with a smaller chunk size): its journal goes with
        it, or nothing would ever remove it."""
        try:
            return self.dt.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            self.dt.unlink(journal, missing_ok=True)
            return self.dt.create_file(part)

    def _drop_part(self, part: str) -> None:
        """A failed whole-file copy keeps nothing: no resume for it, and on a full disk its
        bytes are what the next attempt needs."""
        with contextlib.suppress(OSError):
            self.dt.unlink(part, missing_ok=True)

    def _meta_from_object(self, info: ObjectInfo, t: _Target) -> tuple[int, int, int, int]:
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

    # ------------------------------------------------------------------ chunked into local

    def _start_chunked(self, t: _Target, src_fd: int) -> None:
        """Start a journaled chunked copy of a large file (from S3, or local if src_fd >= 0)."""
        e = t.entry
        chunk = self.opts.chunk_size
        info: ObjectInfo | None = None
        if src_fd >= 0:
            self._open_fds.add(src_fd)
            identity: dict[str, Any] = {"size": e.size, "mtime_ns": e.mtime_ns, "chunk": chunk}
        else:
            assert isinstance(self.src, S3Location) and self.store is not None
            store, bucket = self.store, self.src.bucket
            info = self._retry(f"HEAD {t.src}", lambda: store.head(bucket, t.src))
            if info is None:
                raise SourceNotFoundError(f"{t.src} disappeared from the bucket")
            identity = {"size": info.size, "etag": _clean_etag(info.etag), "chunk": chunk}
            e = Entry(e.rel, "file", size=info.size, etag=info.etag)
        part, journal_path = temp_paths(t.dst)
        journal = ChunkJournal(self.dt, journal_path, identity)
        done = journal.load()
        nchunks = max(1, (e.size + chunk - 1) // chunk)
        fresh = done is None or not _has_size(self.dt, part, e.size)
        if fresh:
            done = set()
            fd = self.dt.create_file(part, os.O_RDWR)
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
            fd = self.dt.open_file(part, os.O_RDWR)
        assert done is not None
        self._open_fds.add(fd)
        journal.start(fresh)
        self._journals.add(journal)
        if src_fd >= 0 and fresh and self._reflink(src_fd, fd):
            done = set(range(nchunks))
            self._moved(e.size)
        hasher: _Hasher | None = None
        crc_check: _CrcCheck | None = None
        if info is not None and self.opts.verify:
            crc_check = self._crc_check_for(t, info, chunk)
        if info is not None and self.opts.verify and crc_check is None:
            etag = _clean_etag(info.etag)
            if _MD5_RE.match(etag):
                part_size = None
                if "-" in etag:
                    part_size = self._guess_part_size(info, int(etag.split("-")[1]))
                if "-" not in etag or part_size is not None:
                    hasher = _Hasher(fd, e.size, chunk, part_size, lead=2 * self.opts.jobs)
                    self._hashers.add(hasher)
        job = _ChunkedFile(self, t, e, info, fd, src_fd, part, journal, nchunks, hasher, crc_check)
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
            log.info(
                "%s: resuming, %d of %d chunks already done", self.shown_dst(t), len(done), nchunks
            )
            self._resumed(resumed)
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
        self._scheduler.push(
            [*(job.chunk_task(i) for i in pending), *(job.recheck_task(i) for i in recheck)]
        )

    def _guess_part_size(self, info: ObjectInfo, nparts: int) -> int | None:
        """The part size a multipart ETag was built with: from our metadata, else a guess."""
        hint = info.metadata.get("stowage-partsize", "")
        candidates = [int(hint)] if hint.isdigit() else []
        candidates += [part_size_for(info.size, self.opts.chunk_size)]
        candidates += [m * MiB for m in (8, 16, 5, 10, 15, 32, 50, 64, 100, 128)]
        for c in candidates:
            if c > 0 and (info.size + c - 1) // c == nparts:
                return c
        return None

    # ------------------------------------------------------------------ S3 destination

    def _local_to_s3(self, t: _Target) -> None:
        assert isinstance(self.dst, S3Location) and self.store is not None
        e = t.entry
        store, bucket = self.store, self.dst.bucket
        if e.kind == "symlink":
            data = os.fsencode(e.target)
            if self._s3_unchanged(t, data):
                self._file_skipped(t)
                return
            self._put_small(t, data, stat.S_IFLNK | 0o777, e.mtime_ns)
            return
        part_size = part_size_for(e.size, self.opts.chunk_size)
        if e.size <= part_size:
            with open(self.st.open_file(t.src), "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read(part_size + 1)
            if len(data) != e.size or st.st_mtime_ns != e.mtime_ns:
                raise VerificationError(
                    f"{self.shown_src(t)} changed during the copy; run the copy again"
                )
            if self._s3_unchanged(t, data):
                self._file_skipped(t)
                return
            self._put_small(t, data, stat.S_IFREG | e.mode, e.mtime_ns)
            return
        if self._s3_unchanged(t, None):
            self._file_skipped(t)
            return
        self._start_multipart(t, store, bucket, part_size)

    def _object_meta(self, mode: int, mtime_ns: int, e: Entry) -> dict[str, str]:
        meta = {"mtime": format_mtime(mtime_ns), "mode": str(mode)}
        if e.uid >= 0:
            meta["uid"] = str(e.uid)
            meta["gid"] = str(e.gid)
        return meta

    def _s3_unchanged(self, t: _Target, data: bytes | None) -> bool:
        if not self.opts.skip_unchanged:
            return False
        info = self._dst_index.get(t.dst)
        if info is None or info.size != t.entry.size:
            return False
        etag = _plain_md5(info.etag)
        if data is not None and etag is not None:
            return hashlib.md5(data).hexdigest() == etag
        assert isinstance(self.dst, S3Location) and self.store is not None
        store, bucket = self.store, self.dst.bucket
        head = self._retry(f"HEAD {t.dst}", lambda: store.head(bucket, t.dst))
        if head is None or head.size != t.entry.size:
            return False
        return parse_mtime(head.metadata.get("mtime")) == t.entry.mtime_ns

    def _put_small(self, t: _Target, data: bytes, mode: int, mtime_ns: int) -> None:
        assert isinstance(self.dst, S3Location) and self.store is not None
        store, bucket = self.store, self.dst.bucket
        meta = self._object_meta(mode, mtime_ns, t.entry)
        if self._bucket is not None:
            self._bucket.take(len(data), self.cancel)
        etag = self._retry(f"PUT {t.dst}", lambda: store.put(bucket, t.dst, data, meta))
        got = _plain_md5(etag)
        check = "size-only"
        if self.opts.verify and got is not None:
            want = hashlib.md5(data).hexdigest()
            if got != want:
                raise VerificationError(
                    f"stored ETag {got} differs from the MD5 {want} of what was sent"
                )
            check = "md5"
        with self._lock:
            self.result.bytes_copied += len(data)
        self.tracker.add_bytes(len(data))
        self._file_copied(t, check)

    def _start_multipart(self, t: _Target, store: ObjectStore, bucket: str, part_size: int) -> None:
        e = t.entry
        fd = self.st.open_file(t.src)
        self._open_fds.add(fd)
        uploads = self._retry(f"LIST UPLOADS {t.dst}", lambda: store.list_uploads(bucket, t.dst))
        upload_id = None
        parts: dict[int, Any] = {}
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
            parts = self._retry(
                f"LIST PARTS {t.dst}", lambda: store.list_parts(bucket, t.dst, uid_)
            )
            log.info("%s: resuming upload %s with %d parts", t.dst, upload_id, len(parts))
        else:
            meta = self._object_meta(stat.S_IFREG | e.mode, e.mtime_ns, e)
            meta["stowage-partsize"] = str(part_size)
            upload_id = self._retry(
                f"CREATE UPLOAD {t.dst}", lambda: store.create_multipart(bucket, t.dst, meta)
            )
        nparts = (e.size + part_size - 1) // part_size
        job = _MultipartUpload(self, t, fd, upload_id, part_size, nparts, parts)
        job.remaining = nparts
        self._scheduler.push(job.part_task(n) for n in range(1, nparts + 1))

    # ------------------------------------------------------------------ directories

    def _make_dirs(self, dirs: list[_Target]) -> None:
        """Create the destination tree up front (parents sort before children). Directories
        that did not exist before cannot hold an up-to-date file: no per-file lstat there."""
        if not isinstance(self.dst, LocalLocation) or self._single:
            return
        self._ready_dirs.add("")
        for d in dirs:
            try:
                # A link planted where the source has a directory becomes a directory.
                if self.dt.makedirs(d.dst):
                    self._fresh_dirs.add(d.dst)
            except NotADirectoryError:
                self._record_error(d.entry.rel, "cannot create directory: a file is in the way")
                continue
            except OSError as exc:
                self._record_error(d.entry.rel, f"cannot create directory: {exc.strerror}")
                continue
            self._ready_dirs.add(d.dst)
        self.result.dirs = len(dirs)

    def _finish_dirs(self, dirs: list[_Target], files: list[_Target]) -> None:
        """Directory modes and mtimes last (writing files into them changes their mtime),
        deepest first; empty directories become marker objects in S3."""
        if isinstance(self.dst, LocalLocation):
            if not isinstance(self.src, LocalLocation):
                return  # S3 has no directory metadata for non-empty directories
            for d in sorted(dirs, key=lambda d: d.entry.rel.count("/"), reverse=True):
                e = d.entry
                try:
                    owner = self._owner_for(e.uid, e.gid, from_s3=False)
                    if owner is not None:
                        self.dt.lchown(d.dst, *owner)
                    # setgid and sticky on a directory grant nothing (group inheritance,
                    # restricted deletion); setuid on a directory means nothing on Linux.
                    self.dt.chmod(d.dst, e.mode & 0o3777)
                    self.dt.utime(d.dst, (e.atime_ns or e.mtime_ns, e.mtime_ns))
                except OSError as exc:
                    self._record_error(e.rel, f"cannot set directory metadata: {exc.strerror}")
            return
        if not self.opts.dir_markers:
            return
        assert isinstance(self.dst, S3Location) and self.store is not None
        store, bucket = self.store, self.dst.bucket
        parents = {os.path.dirname(t.entry.rel) for t in [*files, *dirs]}
        for d in dirs:
            e = d.entry
            key = d.dst + "/"
            if e.rel in parents or key in self._dst_index:
                continue
            meta = self._object_meta(stat.S_IFDIR | e.mode, e.mtime_ns, e)
            try:
                self._retry(f"PUT {key}", _bind_put(store, bucket, key, meta))
                self.result.dirs += 1
            except StagingError as exc:
                self._record_error(e.rel, str(exc))

    def _syncfs(self) -> None:
        self.dt.fsync()
        os.sync()


class _ChunkedFile:
    """One large file being filled chunk by chunk from S3 or a local file."""

    def __init__(
        self,
        copier: _Copier,
        t: _Target,
        entry: Entry,
        info: ObjectInfo | None,
        fd: int,
        src_fd: int,
        part: str,
        journal: ChunkJournal,
        nchunks: int,
        hasher: _Hasher | None,
        crc_check: _CrcCheck | None = None,
    ) -> None:
        self.c = copier
        self.t = t
        self.entry = entry
        self.info = info
        self.fd = fd
        self.src_fd = src_fd
        self.part = part
        self.journal = journal
        self.nchunks = nchunks
        self.hasher = hasher
        self.crc = crc_check
        self.remaining = nchunks
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def _given_up(self) -> bool:
        return self.error is not None or self.c._stopping()

    def chunk_task(self, index: int) -> Callable[[], None]:
        return lambda: _run_piece(self, self._chunk, index)

    def recheck_task(self, index: int) -> Callable[[], None]:
        """CRC of a chunk an earlier run wrote, read back from the part file."""
        assert self.crc is not None
        crc_check, fd = self.crc, self.fd
        return lambda: _run_piece(self, lambda i: crc_check.from_file(i, fd), index)

    def _chunk(self, index: int) -> None:
        if self.hasher is not None:
            # A failed chunk is never hashed: its siblings must not wait for the hash.
            self.hasher.wait_for_room(index, self._given_up)
            if self._given_up():
                self.c._check_stop()
                return  # another chunk failed; finish() reports that error
        self._copy_chunk(index)
        self.journal.record(index)
        if self.hasher is not None:
            self.hasher.mark(index)

    def _copy_chunk(self, index: int) -> None:
        chunk = self.c.opts.chunk_size
        start = index * chunk
        length = min(chunk, self.entry.size - start)
        if self.src_fd >= 0:
            moved = [0]

            def step(n: int) -> None:
                moved[0] += n
                self.c._moved(n)

            localfs.copy_range(self.src_fd, self.fd, start, length, step)
            # Holes are not copied but count as done for progress.
            self.c.tracker.add_bytes(length - moved[0])
            return
        c = self.c
        assert isinstance(c.src, S3Location) and c.store is not None
        store, bucket, key, fd = c.store, c.src.bucket, self.t.src, self.fd
        got = [0]
        # The CRC of the chunk, computed on the buffer just written (awscrt releases the GIL:
        # the workers' CRCs run in parallel, no pass over the file at the end).
        feed = self.crc.feeder(index) if self.crc is not None else None

        def sink(offset: int, data: memoryview) -> None:
            n = os.pwrite(fd, data, offset)
            if n != len(data):
                raise OSError(28, "short write (disk full?)")
            if feed is not None:
                feed.update(offset, data)
            got[0] += n
            c._moved(n)

        def attempt() -> ObjectInfo:
            # A retry asks only for what the broken stream did not deliver.
            return store.get(bucket, key, sink, start + got[0], length - got[0])

        info = c._retry(f"GET {key} bytes {start}-{start + length - 1}", attempt)
        if (
            self.info is not None
            and info.etag
            and _clean_etag(info.etag) != _clean_etag(self.info.etag)
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

    def finish(self) -> None:
        c, t, e = self.c, self.t, self.entry
        try:
            if self.error is not None:
                if self.hasher is not None:
                    self.hasher.stop()
                raise self.error
            size = os.fstat(self.fd).st_size
            if size != e.size:
                raise VerificationError(f"part file has {size} bytes of {e.size}; not renamed")
            check = "size-only"
            if self.crc is not None:
                got = self.crc.result()
                if got != self.crc.want:
                    # A corrupt part file must not be resumed: start from scratch next time.
                    self.journal.remove()
                    c.dt.unlink(self.part, missing_ok=True)
                    raise VerificationError(
                        f"{self.crc.algorithm} {got} does not match the store's "
                        f"{self.crc.want}; not renamed, rerun the copy"
                    )
                check = self.crc.algorithm
            elif self.hasher is not None:
                got = self.hasher.result()
                want = _clean_etag(self.info.etag) if self.info else ""
                if got != want:
                    # A corrupt part file must not be resumed: start from scratch next time.
                    self.journal.remove()
                    c.dt.unlink(self.part, missing_ok=True)
                    raise VerificationError(
                        f"MD5 {got} does not match ETag {want}; not renamed, rerun the copy"
                    )
                check = "md5"
            if self.info is not None:
                mode, mtime_ns, uid, gid = c._meta_from_object(self.info, t)
                c._apply_meta(self.fd, mode, 0, mtime_ns, uid, gid, from_s3=True)
            else:
                c._apply_meta(self.fd, e.mode, e.atime_ns, e.mtime_ns, e.uid, e.gid)
            c._rename(self.part, t.dst)
            self.journal.remove()
            c._journals.discard(self.journal)
            c._file_copied(t, check)
        except BaseException as exc:
            self.journal.close()
            c._file_failed(t, exc)
        finally:
            if self.hasher is not None:
                c._hashers.discard(self.hasher)
            for fd in (self.fd, self.src_fd):
                if fd >= 0 and fd in c._open_fds:
                    c._open_fds.discard(fd)
                    os.close(fd)


class _MultipartUpload:
    """One large file going up as a multipart upload; ListParts is its resume journal."""

    def __init__(
        self,
        copier: _Copier,
        t: _Target,
        fd: int,
        upload_id: str,
        part_size: int,
        nparts: int,
        existing: dict[int, Any],
    ) -> None:
        self.c = copier
        self.t = t
        self.fd = fd
        self.upload_id = upload_id
        self.part_size = part_size
        self.nparts = nparts
        self.existing = existing
        self.etags: dict[int, str] = {}
        self.md5s: dict[int, bytes] = {}
        self.remaining = nparts
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def part_task(self, number: int) -> Callable[[], None]:
        return lambda: _run_piece(self, self._upload_part, number)

    def _upload_part(self, number: int) -> None:
        c, t = self.c, self.t
        assert isinstance(c.dst, S3Location) and c.store is not None
        offset = (number - 1) * self.part_size
        length = min(self.part_size, t.entry.size - offset)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise VerificationError(f"{c.shown_src(t)} shrank during the copy; run the copy again")
        old = self.existing.get(number)
        md5 = ""
        raw: bytes | None = None
        # MD5 costs ~1.5 s of CPU per GiB here: only for verification or to judge an old part.
        if c.opts.verify or old is not None:
            digest = hashlib.md5(data)
            md5, raw = digest.hexdigest(), digest.digest()
            with self._lock:
                self.md5s[number] = raw
        if old is not None and old.size == length and _clean_etag(old.etag) == md5:
            with self._lock:
                self.etags[number] = old.etag
            c._resumed(length)
            return
        if c._bucket is not None:
            c._bucket.take(length, c.cancel)
        store, bucket, uid = c.store, c.dst.bucket, self.upload_id
        etag = c._retry(
            f"UPLOAD PART {number}/{self.nparts} of {t.dst}",
            lambda: store.upload_part(
                bucket, t.dst, uid, number, data, raw if c.opts.verify else None
            ),
        )
        got = _clean_etag(etag)
        if c.opts.verify and _MD5_RE.match(got) and got != md5:
            raise VerificationError(f"part {number}: stored ETag {got} differs from MD5 {md5}")
        with self._lock:
            self.etags[number] = etag
            c.result.bytes_copied += length
        c.tracker.add_bytes(length)
        c._check_stop()

    def finish(self) -> None:
        c, t = self.c, self.t
        assert isinstance(c.dst, S3Location) and c.store is not None
        store, bucket = c.store, c.dst.bucket
        try:
            if self.error is not None:
                raise self.error  # the upload stays for the next run to resume
            st = os.fstat(self.fd)
            if st.st_size != t.entry.size or st.st_mtime_ns != t.entry.mtime_ns:
                raise VerificationError(
                    f"{c.shown_src(t)} changed during the copy; run the copy again"
                )
            parts = [(n, self.etags[n]) for n in range(1, self.nparts + 1)]
            numbers = range(1, self.nparts + 1)
            want = multipart_etag(self.md5s[n] for n in numbers) if c.opts.verify else ""
            etag = c._retry(
                f"COMPLETE UPLOAD {t.dst}",
                lambda: store.complete_multipart(bucket, t.dst, self.upload_id, parts),
            )
            got = _clean_etag(etag)
            if c.opts.verify and "-" in got and got != want:
                raise VerificationError(f"multipart ETag {got} differs from expected {want}")
            if c.opts.verify and got != want:
                # A matching multipart ETag already proves the object is exactly our parts;
                # an opaque one leaves the size to check. Only then: a HEAD right after
                # completion makes `rclone serve s3` hash the whole object, 1.5 s per GiB.
                # Unverified copies trust the acknowledged parts, as unverified PUTs do.
                head = c._retry(f"HEAD {t.dst}", lambda: store.head(bucket, t.dst))
                if head is None or head.size != t.entry.size:
                    raise VerificationError(
                        f"stored object has {head.size if head else 'no'} bytes, "
                        f"expected {t.entry.size}"
                    )
            c._file_copied(t, "md5" if c.opts.verify and self.md5s else "size-only")
        except BaseException as exc:
            c._file_failed(t, exc)
        finally:
            if self.fd in c._open_fds:
                c._open_fds.discard(self.fd)
                os.close(self.fd)


def _run_piece(job: _ChunkedFile | _MultipartUpload, fn: Callable[[int], None], n: int) -> None:
    """Run one chunk/part of a split file: the first error wins and later pieces are skipped;
    whichever piece finishes last (failed or not) calls the job's finish()."""
    try:
        if job.error is None:
            job.c._check_stop()
            fn(n)
    except BaseException as exc:
        with job._lock:
            if job.error is None:
                job.error = exc
    with job._lock:
        job.remaining -= 1
        last = job.remaining == 0
    if last:
        job.finish()


class _ChunkCrc:
    """CRCs of one chunk's segments, fed with the chunk's bytes in order as they arrive."""

    def __init__(self, fn: crc.CrcFn, segments: list[tuple[int, int]]) -> None:
        self._fn = fn
        self._segments = segments
        self.values = [0] * len(segments)
        self._pos = segments[0][0]
        self._i = 0
        self._broken = False

    def update(self, offset: int, data: memoryview) -> None:
        if offset != self._pos or self._broken:
            self._broken = True  # not in order: the caller reads the chunk back instead
            return
        while len(data):
            if self._i >= len(self._segments):
                self._broken = True
                return
            end = self._segments[self._i][1]
            if self._pos >= end:
                self._i += 1
                continue
            k = min(len(data), end - self._pos)
            self.values[self._i] = self._fn(data[:k], self.values[self._i])
            data = data[k:]
            self._pos += k

    def complete(self) -> bool:
        return not self._broken and self._pos == self._segments[-1][1]


class _CrcCheck:
    """The store's CRC of a file filled chunk by chunk in any order: each chunk's CRC is
    computed by the worker that writes it (on the received buffer), and `result` combines them
    in order with arithmetic on the CRCs alone, so verification adds no sequential pass.

    A full-object CRC combines every chunk. A composite one (CRC of the part CRCs, what S3
    keeps for a multipart upload with CRC32/CRC32C by default) needs the part CRCs: chunks are
    cut at part boundaries into segments, the segments of each part combined, then the CRC of
    the concatenated big-endian part CRCs taken, with "-N" appended.
    """

    def __init__(self, cs: Checksum, size: int, chunk: int, part_size: int | None) -> None:
        fn = crc.compute_fn(cs.algorithm)
        assert fn is not None
        self.algorithm = cs.algorithm
        self._fn = fn
        self._size = size
        self._chunk = chunk
        self._part_size = part_size
        self._nchunks = max(1, (size + chunk - 1) // chunk)
        self._crcs: list[list[int] | None] = [None] * self._nchunks
        self._lock = threading.Lock()
        self.want = _crc_value(cs)
        if part_size is not None:
            self.want += f"-{max(1, (size + part_size - 1) // part_size)}"

    def segments(self, index: int) -> list[tuple[int, int]]:
        start = index * self._chunk
        end = min(start + self._chunk, self._size)
        if self._part_size is None:
            return [(start, end)]
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            cut = min(end, (pos // self._part_size + 1) * self._part_size)
            out.append((pos, cut))
            pos = cut
        return out or [(start, end)]

    def feeder(self, index: int) -> _ChunkCrc:
        return _ChunkCrc(self._fn, self.segments(index))

    def store(self, index: int, values: list[int]) -> None:
        with self._lock:
            self._crcs[index] = list(values)

    def from_file(self, index: int, fd: int) -> None:
        """The chunk's CRCs from the part file (pread into a reused buffer; a short read
        leaves them unknown, which fails the check)."""
        feed = self.feeder(index)
        buf = bytearray(min(1 << 20, self._chunk))
        view = memoryview(buf)
        for start, end in feed._segments:
            pos = start
            while pos < end:
                n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
                if n <= 0:
                    log.warning("part file shrank while being verified (at byte %d)", pos)
                    return
                feed.update(pos, view[:n])
                pos += n
        if feed.complete():
            self.store(index, feed.values)

    def result(self) -> str | None:
        """The CRC in the store's form, or None if a chunk's CRC is missing."""
        with self._lock:
            if any(v is None for v in self._crcs):
                return None
            pieces = [
                (crc_value, end - start)
                for i, values in enumerate(self._crcs)
                if values is not None
                for (start, end), crc_value in zip(self.segments(i), values, strict=True)
            ]
        alg = self.algorithm
        if self._part_size is None:
            total, _ = pieces[0]
            for value, length in pieces[1:]:
                total = crc.combine(alg, total, value, length)
            return crc.encode(alg, total)
        # Composite: combine the segments of each part, then the CRC of the part CRCs.
        parts: list[int] = []
        pos = 0
        for value, length in pieces:
            if pos % self._part_size == 0:
                parts.append(value)
            else:
                parts[-1] = crc.combine(alg, parts[-1], value, length)
            pos += length
        width = crc.width_bytes(alg)
        joined = b"".join(p.to_bytes(width, "big") for p in parts)
        return f"{crc.encode(alg, self._fn(joined, 0))}-{len(parts)}"


def _usable_crc(info: ObjectInfo) -> tuple[Checksum, int | None] | None:
    """(checksum, None) for a full-object CRC, (checksum, number of parts) for a composite
    one, or None when there is none we can compute or it is ambiguous: a multipart object's
    CRC32/CRC32C whose type the store does not give (moto says nothing for its composite
    ones) is not trusted; CRC64NVME is full-object by definition."""
    cs = info.checksum
    if cs is None or not crc.supported(cs.algorithm):
        return None
    _, dash, suffix = cs.value.partition("-")
    etag = _clean_etag(info.etag)
    multipart = bool(_MD5_RE.match(etag)) and "-" in etag
    if dash or cs.type == "COMPOSITE":
        if suffix.isdigit():
            return cs, int(suffix)
        if multipart:
            return cs, int(etag.split("-")[1])
        return None
    if cs.type == "FULL_OBJECT" or cs.algorithm == "crc64nvme":
        return cs, None
    if multipart or "-" in etag:
        return None
    return cs, None


def _crc_value(cs: Checksum) -> str:
    """The base64 CRC without a composite "-N" suffix."""
    return cs.value.partition("-")[0]


def _plain_md5(etag: str) -> str | None:
    """The cleaned ETag if it is a plain MD5 of the body (not multipart, not opaque)."""
    clean = _clean_etag(etag)
    return clean if _MD5_RE.match(clean) and "-" not in clean else None


def _initiated(u: UploadInfo) -> float:
    return u.initiated


def _bind_put(store: ObjectStore, bucket: str, key: str, meta: dict[str, str]) -> Callable[[], str]:
    return lambda: store.put(bucket, key, b"", meta)


def _has_size(tree: Tree, rel: str, size: int) -> bool:
    try:
        st = tree.lstat(rel)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _md5_fd(fd: int) -> str:
    """MD5 of an open file; the descriptor is closed."""
    h = hashlib.md5()
    with open(fd, "rb") as fh:
        while block := fh.read(STREAM_BUFSIZE):
            h.update(block)
    return h.hexdigest()
