"""Async object-store API over a blocking boto3 client.

Every boto3 call runs in a worker thread (`trio.to_thread.run_sync`) under one capacity
limiter, so the trio loop keeps serving FUSE requests while S3 answers. botocore errors are
translated here into `NotFoundError` / `RemoteError`; nothing above this module sees boto3.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import http.client
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from plugin.fusefs.errors import FsError, NotFoundError, RemoteError, StaleError
from plugin.s3fast import FastClient, FastPathError, parse_http_date, read_exact

if TYPE_CHECKING:
    from plugin.fusefs.cache import UploadConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per read from a GET body; large enough to keep per-call overhead small.
STREAM_CHUNK = 1 << 20
#: CopyObject's limit; larger objects need a multipart copy.
MAX_COPY_SIZE = 5 * (1 << 30)
#: S3 allows at most this many parts per multipart upload.
MAX_PARTS = 10_000

DIR_CONTENT_TYPE = "application/x-directory"
META_PREFIX = "x-amz-meta-"
#: Connections (threads) a listing's pipelined HEADs are spread over.
HEAD_STREAMS = 4


@contextlib.contextmanager
def _put_not_found(key: str) -> Iterator[None]:
    """A PUT answered 404 is no missing object: the bucket is gone, or the server cannot
    store the name (moto's server routes no key with a newline). An upload failure, kept and
    retried like the others, never ENOENT for a file the user just wrote."""
    try:
        yield
    except NotFoundError as exc:
        raise RemoteError(
            f"put {key!r}: the server answered 404 Not Found (the bucket is gone, or the server "
            "cannot store this name)"
        ) from exc


@dataclass
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    last_modified_ns: int
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None


@dataclass
class ListPage:
    """One ListObjectsV2 page, relative to the listed prefix."""

    files: list[ObjectInfo]
    dirs: list[str]
    next_token: str | None


def _ns(dt: Any) -> int:
    return int(dt.timestamp() * 1_000_000_000) if dt is not None else 0


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _body_reader(body: Any, response: dict[str, Any]) -> Callable[[memoryview], int]:
    """readinto for a GET body. botocore's read() copies every byte two or three times on
    its way up (http.client -> urllib3 -> bytes); reading the http.client response straight
    into our buffer saves that CPU, which a 2-core machine spends on the data path. Falls
    back to read() when the layout is not the expected one or the body is encoded."""
    raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    if isinstance(raw, http.client.HTTPResponse) and not headers.get("content-encoding"):
        sock = getattr(getattr(raw.fp, "raw", None), "_sock", None)
        # Plain TCP only: TLS sockets (ssl.SSLSocket, a subclass) take no recv flags.
        if type(sock) is socket.socket and raw.length is not None and not raw.chunked:
            return _SocketBody(raw, sock).read_into
        return raw.readinto

    def _read(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return _read


class _SocketBody:
    """Reads a body of known length straight from the connection's socket (see
    `s3fast.read_exact`: one syscall and one release of the GIL per buffer instead of one per
    arriving segment; eight GET threads and the FUSE loop share the GIL, and each
    reacquisition is a chance for the others to stall, which left both cores idle a fifth
    of a cold read).

    Only for a body read to its end or abandoned: http.client's own bookkeeping is
    bypassed, so the caller closes the response (and with it the connection) afterwards.
    """

    def __init__(self, response: http.client.HTTPResponse, sock: socket.socket) -> None:
        self._response = response
        self._sock = sock
        self._left = response.length or 0

    def read_into(self, view: memoryview) -> int:
        want = min(len(view), self._left)
        fp = self._response.fp
        if not want or fp is None:
            return 0
        n = read_exact(fp, self._sock, view[:want])
        self._left -= n
        return n


class LazyClient:
    """Stands in for the boto3 client while a background thread builds it.

    Importing boto3 and creating a client take a few hundred ms of CPU, and the mount should
    be live before that. Every client call runs in a worker thread (`ObjectStore._run`), so
    a call made early simply waits there, off the trio loop, until the client exists.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._client: Any = None
        self._error: str | None = None

    def set(self, client: Any) -> None:
        self._client = client
        self._event.set()

    def fail(self, error: str) -> None:
        self._error = error
        self._event.set()

    def get(self) -> Any:
        self._event.wait()
        if self._error is not None:
            raise RemoteError(f"no S3 client: {self._error}")
        return self._client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def _call(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.get(), name)(*args, **kwargs)

        return _call


class ObjectStore:
    """One bucket, accessed through a thread-safe boto3 client."""

    def __init__(
        self, client: Any, bucket: str, *, max_threads: int = 16, data_threads: int = 8
    ) -> None:
        self.client = client
        self.bucket = bucket
        self._limiter = trio.CapacityLimiter(max_threads)
        #: Ranged GETs get their own threads, so read-ahead never starves HEAD and LIST.
        self._data_limiter = trio.CapacityLimiter(data_threads)
        #: Cheap signed HEAD, LIST and GET (see plugin.s3fast); None means boto3 only.
        self.fast_client: FastClient | None = None

    async def _run(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        _limiter: trio.CapacityLimiter | None = None,
        **kwargs: Any,
    ) -> T:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), limiter=_limiter or self._limiter
            )
        except FsError:
            raise
        except Exception as exc:
            # Imported here, not at module level: importing boto3 costs hundreds of ms and
            # the mount goes live before that (see LazyClient). By now it is loaded anyway.
            import botocore.exceptions

            from plugin import s3client

            if isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
                if s3client.is_not_found(exc):
                    raise NotFoundError(what) from exc
                if s3client.error_code(exc) in ("412", "PreconditionFailed"):
                    raise StaleError(f"{what}: the object changed on the server") from exc
                raise RemoteError(f"{what}: {exc}") from exc
            if isinstance(exc, OSError):
                # urllib3/socket errors that botocore did not wrap.
                raise RemoteError(f"{what}: {exc}") from exc
            raise

    async def check_bucket(self, prefix: str) -> None:
        """Fail early, with S3's own message, if the bucket cannot be listed."""
        await self._run(
            f"list s3://{self.bucket}/{prefix}",
            self.client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=prefix,
            MaxKeys=1,
        )

    @staticmethod
    def _info_from_headers(key: str, status: int, headers: dict[str, str]) -> ObjectInfo | None:
        if status == 404:
            return None
        return ObjectInfo(
            key=key,
            size=int(headers.get("content-length", 0)),
            etag=_etag(headers.get("etag")),
            last_modified_ns=parse_http_date(headers.get("last-modified")),
            metadata={
                k[len(META_PREFIX) :]: v for k, v in headers.items() if k.startswith(META_PREFIX)
            },
            content_type=headers.get("content-type"),
        )

    async def head_many(
        self, keys: list[str], *, concurrency: int = 32
    ) -> list[ObjectInfo | FsError | None]:
        """HEAD many keys at once (directory listings). A failure is returned in place of
        that key's answer, so one bad object does not fail the others."""
        results: list[ObjectInfo | FsError | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        fast = self.fast_client
        if fast is not None and fast.enabled and keys:
            streams = min(HEAD_STREAMS, -(-len(keys) // 16))
            chunks = [todo[i::streams] for i in range(streams)]
            retry: list[int] = []

            async def _chunk(idx: list[int]) -> None:
                answers = await trio.to_thread.run_sync(
                    fast.head_many, [keys[i] for i in idx], limiter=self._limiter
                )
                for i, answer in zip(idx, answers, strict=True):
                    if isinstance(answer, FastPathError):
                        retry.append(i)
                    else:
                        results[i] = self._info_from_headers(keys[i], *answer)

            async with trio.open_nursery() as nursery:
                for idx in chunks:
                    nursery.start_soon(_chunk, idx)
            todo = sorted(retry)
        limiter = trio.Semaphore(concurrency)

        async def _one(i: int) -> None:
            async with limiter:
                try:
                    results[i] = await self.head(keys[i], fast=False)
                except FsError as exc:
                    results[i] = exc

        async with trio.open_nursery() as nursery:
            for i in todo:
                nursery.start_soon(_one, i)
        return results

    async def head(self, key: str, *, fast: bool = True) -> ObjectInfo | None:
        client = self.fast_client
        if fast and client is not None and client.enabled:
            try:
                status, headers = await trio.to_thread.run_sync(
                    client.head, key, limiter=self._limiter
                )
            except FastPathError as exc:
                log.debug("fast HEAD %s: %s; asking boto3", key, exc)
            else:
                return self._info_from_headers(key, status, headers)
        try:
            r = await self._run(f"head {key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except NotFoundError:
            return None
        return ObjectInfo(
            key=key,
            size=int(r.get("ContentLength", 0)),
            etag=_etag(r.get("ETag")),
            last_modified_ns=_ns(r.get("LastModified")),
            metadata=dict(r.get("Metadata") or {}),
            content_type=r.get("ContentType"),
        )

    async def list_page(
        self, prefix: str, token: str | None, *, delimiter: str | None = "/", max_keys: int = 1000
    ) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        log.debug("list %s (continued: %s)", prefix, token is not None)
        r: dict[str, Any] | None = None
        fast = self.fast_client
        if fast is not None and fast.enabled:
            try:
                r = await trio.to_thread.run_sync(
                    fast.list_v2, prefix, token, delimiter, max_keys, limiter=self._limiter
                )
            except FastPathError as exc:
                log.debug("fast LIST %s: %s; asking boto3", prefix, exc)
        if r is None:
            r = await self._run(f"list {prefix}", self.client.list_objects_v2, **kwargs)
        assert r is not None
        files = [
            ObjectInfo(
                key=o["Key"],
                size=int(o.get("Size", 0)),
                etag=_etag(o.get("ETag")),
                last_modified_ns=o["LastModifiedNs"]
                if "LastModifiedNs" in o
                else _ns(o.get("LastModified")),
            )
            for o in r.get("Contents", [])
        ]
        dirs = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
        token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
        return ListPage(files=files, dirs=dirs, next_token=token)

    async def list_keys(self, prefix: str) -> list[ObjectInfo]:
        """Every object below *prefix*, recursively (for directory rename)."""
        out: list[ObjectInfo] = []
        token = None
        while True:
            page = await self.list_page(prefix, token, delimiter=None)
            out.extend(page.files)
            token = page.next_token
            if token is None:
                return out

    async def get_bytes(self, key: str) -> bytes:
        """A whole (small) object, e.g. a symlink's target."""

        def _get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return await self._run(f"get {key}", _get)

    async def put_bytes(
        self, key: str, data: bytes, metadata: dict[str, str], content_type: str | None = None
    ) -> str | None:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "Metadata": metadata,
        }
        if content_type:
            kwargs["ContentType"] = content_type
        with _put_not_found(key):
            r = await self._run(f"put {key}", self.client.put_object, **kwargs)
        return _etag(r.get("ETag"))

    async def fetch_into(
        self,
        key: str,
        start: int,
        end: int,
        fd: int,
        gaps: list[tuple[int, int]],
        *,
        etag: str | None,
    ) -> None:
        """GET `[start, end)` of *key* and pwrite the parts that fall into *gaps* to *fd*."""
        await self._run(
            f"get {key} [{start}, {end})",
            self._fetch_into_sync,
            key,
            start,
            end,
            fd,
            gaps,
            etag,
            _limiter=self._data_limiter,
        )

    async def fetch_buffer(
        self,
        key: str,
        start: int,
        end: int,
        buf: memoryview,
        *,
        etag: str | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """GET `[start, end)` of *key* straight into *buf* (streamed reads keep no file).
        *progress* is called in the worker thread with the bytes in place so far."""
        await self._run(
            f"get {key} [{start}, {end})",
            self._fetch_buffer_sync,
            key,
            start,
            end,
            buf,
            etag,
            progress,
            _limiter=self._data_limiter,
        )

    def _open_range(
        self, key: str, start: int, end: int, etag: str | None
    ) -> tuple[Any, Callable[[memoryview], int]]:
        """Start a ranged GET; returns the body (to close) and its readinto."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if etag:
            # Never splice bytes of a newer object version into an older cached one.
            kwargs["IfMatch"] = f'"{etag}"'
        r = self.client.get_object(**kwargs)
        body = r["Body"]
        got = _etag(r.get("ETag"))
        if etag and got and got != etag:
            # Some servers (rclone serve s3) ignore If-Match; check the answer ourselves.
            body.close()
            raise StaleError(f"get {key}: the object changed on the server")
        answered = r.get("ContentRange") or ""
        if not answered.startswith(f"bytes {start}-{end - 1}/") and not (
            start == 0 and not answered and r.get("ContentLength") == end
        ):
            # A server that ignored Range would put the object's first bytes at *start*.
            body.close()
            raise RemoteError(f"get {key}: asked for bytes {start}-{end - 1}, got {answered!r}")
        return body, _body_reader(body, r)

    @staticmethod
    def _read_exactly(
        read_into: Callable[[memoryview], int],
        view: memoryview,
        key: str,
        pos: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Fill *view* (object bytes from *pos* on); a body that ends early is an error."""
        done = 0
        while done < len(view):
            n = read_into(view[done:])
            if not n:
                raise RemoteError(
                    f"get {key}: body ended at {pos + done}, expected {pos + len(view)}"
                )
            done += n
            if progress is not None:
                progress(done)

    def _fetch_buffer_sync(
        self,
        key: str,
        start: int,
        end: int,
        buf: memoryview,
        etag: str | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        body, read_into = self._open_range(key, start, end, etag)
        try:
            self._read_exactly(read_into, buf[: end - start], key, start, progress)
        finally:
            body.close()

    def _fetch_into_sync(
        self, key: str, start: int, end: int, fd: int, gaps: list[tuple[int, int]], etag: str | None
    ) -> None:
        body, read_into = self._open_range(key, start, end, etag)
        try:
            buf = memoryview(bytearray(min(STREAM_CHUNK, end - start)))
            pos = start
            gi = 0
            while pos < end:
                n = min(len(buf), end - pos)
                self._read_exactly(read_into, buf[:n], key, pos)
                chunk = buf[:n]
                cend = pos + n
                while gi < len(gaps) and gaps[gi][1] <= pos:
                    gi += 1
                j = gi
                while j < len(gaps) and gaps[j][0] < cend:
                    s, e = max(gaps[j][0], pos), min(gaps[j][1], cend)
                    view = chunk[s - pos : e - pos]
                    while view:
                        w = os.pwrite(fd, view, s)
                        view = view[w:]
                        s += w
                    j += 1
                pos = cend
        finally:
            body.close()

    async def upload_file(
        self,
        key: str,
        fd: int,
        size: int,
        metadata: dict[str, str],
        content_type: str | None,
        config: UploadConfig,
    ) -> str | None:
        """Upload `size` bytes of *fd*: one PUT below the threshold, multipart above."""
        with _put_not_found(key):
            if size < config.multipart_threshold:
                return await self._run(
                    f"put {key}", self._put_fd_sync, key, fd, size, metadata, content_type
                )
            return await self._run(
                f"multipart upload {key}",
                self._multipart_sync,
                key,
                fd,
                size,
                metadata,
                content_type,
                config,
            )

    def _put_fd_sync(
        self, key: str, fd: int, size: int, metadata: dict[str, str], content_type: str | None
    ) -> str | None:
        data = os.pread(fd, size, 0) if size else b""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "Metadata": metadata,
        }
        if content_type:
            kwargs["ContentType"] = content_type
        return _etag(self.client.put_object(**kwargs).get("ETag"))

    def _multipart_sync(
        self,
        key: str,
        fd: int,
        size: int,
        metadata: dict[str, str],
        content_type: str | None,
        config: UploadConfig,
    ) -> str | None:
        part_size = max(config.part_size, -(-size // MAX_PARTS))
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Metadata": metadata}
        if content_type:
            kwargs["ContentType"] = content_type
        upload_id = self.client.create_multipart_upload(**kwargs)["UploadId"]

        def _part(number: int) -> dict[str, Any]:
            offset = (number - 1) * part_size
            data = os.pread(fd, min(part_size, size - offset), offset)
            r = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
            return {"PartNumber": number, "ETag": r["ETag"]}

        count = -(-size // part_size)
        try:
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=config.concurrency, thread_name_prefix="upload-part"
            ) as pool:
                parts = list(pool.map(_part, range(1, count + 1)))
            r = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # best effort: the original error matters more
                log.warning("abort of multipart upload %s for %s failed: %s", upload_id, key, exc)
            raise
        log.debug("multipart upload of %s: %d parts of %d bytes", key, count, part_size)
        return _etag(r.get("ETag"))

    async def copy(
        self,
        src: str,
        dst: str,
        *,
        size: int,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> str | None:
        """Server-side copy; returns the new ETag if known. Passing *metadata* replaces the
        object's metadata (chmod/chown/utimens copy an object onto itself)."""
        source = {"Bucket": self.bucket, "Key": src}
        extra: dict[str, Any] = {}
        if metadata is not None:
            extra = {"MetadataDirective": "REPLACE", "Metadata": metadata}
            if content_type:
                extra["ContentType"] = content_type
        if size < MAX_COPY_SIZE:
            r = await self._run(
                f"copy {src} -> {dst}",
                self.client.copy_object,
                Bucket=self.bucket,
                Key=dst,
                CopySource=source,
                **extra,
            )
            return _etag((r.get("CopyObjectResult") or {}).get("ETag"))
        await self._run(
            f"copy {src} -> {dst}",
            self.client.copy,
            source,
            self.bucket,
            dst,
            ExtraArgs=extra or None,
        )
        return None

    async def delete(self, key: str) -> None:
        await self._run(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    async def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = await self._run(
                f"delete {len(batch)} keys",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = r.get("Errors") or []
            if errors:
                raise RemoteError(f"delete failed for {len(errors)} keys, e.g. {errors[0]}")
