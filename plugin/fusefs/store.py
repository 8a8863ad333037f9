"""The FUSE process's async object store: one bucket, through the S3 layer (plugin.s3).

Every blocking call runs in a worker thread (`trio.to_thread.run_sync`) under one capacity
limiter, so the trio loop keeps serving FUSE requests while S3 answers. HEAD and LIST try the
hand-signed path first (`plugin.s3.fallback`), everything else goes through boto3. S3 errors
are translated here into `NotFoundError` / `StaleError` / `RemoteError`; nothing above this
module sees boto3.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from plugin.fusefs import ranged
from plugin.fusefs.errors import FsError, NotFoundError, RemoteError, StaleError
from plugin.fusefs.loopio import LOOP_PUT_MAX, LoopRequests
from plugin.s3.dates import from_datetime, parse_http_date
from plugin.s3.errors import PRECONDITION_CODES, FastPathError, error_code, is_not_found
from plugin.s3.fallback import fast_or_fallback_async
from plugin.s3.fast import FastClient
from plugin.s3.multipart import upload_fd
from plugin.s3.store import MAX_COPY_SIZE

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20


DIR_CONTENT_TYPE = "application/x-directory"
#: Single PUTs up to this size go through the fast path (hand-signed, Content-MD5 checked by
#: the server): 64 KiB took 1.0-1.3 ms there against 2.4-2.8 ms through boto3 on the bench
#: machine, most of a small file's create. Larger bodies go through boto3.
FAST_PUT_MAX = MiB
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


def _read_whole(fd: int, size: int) -> bytes:
    """The first *size* bytes of cache file *fd*: short means it changed under us."""
    data = os.pread(fd, size, 0) if size else b""
    if len(data) != size:
        raise OSError(f"cache file holds {len(data)} bytes, not {size}")
    return data


@dataclass(frozen=True)
class UploadConfig:
    """When a file goes up in parts, how large they are and how many go at once."""

    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    concurrency: int = 4


@dataclass
class ObjectInfo:
    """An object as the filesystem sees it: ETag without quotes, times in nanoseconds."""

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


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


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
        #: Cheap signed HEAD, LIST and GET (see plugin.s3.fast); None means boto3 only.
        self.fast_client: FastClient | None = None
        #: HEAD, LIST and small PUTs sent from the trio loop itself (plugin.fusefs.loopio);
        #: False sends them from worker threads, as everything else.
        self.loop_io = True
        self._loop: LoopRequests | None = None

    async def aclose(self) -> None:
        """Close the loop's connections (the worker threads' close with the fast client)."""
        if self._loop is not None:
            await self._loop.aclose()
            self._loop = None

    def loop_requests(self) -> LoopRequests | None:
        """The loop's own requests for the current fast client, if it is on."""
        fast = self.fast_client
        if not self.loop_io or fast is None or not fast.enabled:
            return None
        if self._loop is None or self._loop.fast is not fast:
            self._loop = LoopRequests(fast)
        return self._loop

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

            if error_code(exc) is not None:
                if is_not_found(exc):
                    raise NotFoundError(what) from exc
                if error_code(exc) in PRECONDITION_CODES:
                    raise StaleError(f"{what}: the object changed on the server") from exc
                raise RemoteError(f"{what}: {exc}") from exc
            if isinstance(exc, botocore.exceptions.BotoCoreError):
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
    def info_from_headers(key: str, status: int, headers: dict[str, str]) -> ObjectInfo | None:
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
                        results[i] = self.info_from_headers(keys[i], *answer)

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
        client = self.fast_client if fast else None

        async def _fast() -> ObjectInfo | None:
            assert client is not None
            status, headers = await trio.to_thread.run_sync(client.head, key, limiter=self._limiter)
            return self.info_from_headers(key, status, headers)

        async def _boto3() -> ObjectInfo | None:
            try:
                r = await self._run(
                    f"head {key}", self.client.head_object, Bucket=self.bucket, Key=key
                )
            except NotFoundError:
                return None
            return ObjectInfo(
                key=key,
                size=int(r.get("ContentLength", 0)),
                etag=_etag(r.get("ETag")),
                last_modified_ns=from_datetime(r.get("LastModified")),
                metadata=dict(r.get("Metadata") or {}),
                content_type=r.get("ContentType"),
            )

        usable = client is not None and client.enabled
        return await fast_or_fallback_async(f"HEAD {key}", _fast if usable else None, _boto3)

    async def list_page(
        self, prefix: str, token: str | None, *, delimiter: str | None = "/", max_keys: int = 1000
    ) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        log.debug("list %s (continued: %s)", prefix, token is not None)
        fast = self.fast_client

        async def _fast() -> dict[str, Any]:
            assert fast is not None
            return await trio.to_thread.run_sync(
                fast.list_v2, prefix, token, delimiter, max_keys, limiter=self._limiter
            )

        async def _boto3() -> dict[str, Any]:
            return await self._run(f"list {prefix}", self.client.list_objects_v2, **kwargs)

        r = await fast_or_fallback_async(
            f"LIST {prefix}", _fast if fast is not None and fast.enabled else None, _boto3
        )
        return self._page(r)

    async def stat(
        self, key: str, dir_prefix: str, *, expect_missing: bool = False
    ) -> ObjectInfo | ListPage:
        """What a name is: the object at *key* if there is one, else the first entry below
        *dir_prefix* (empty: no directory either).

        HEAD and, after a 404, LIST go from the loop itself (plugin.fusefs.loopio), or if
        that fails in one worker-thread job: the LOOKUP of a new name (every create) pays no
        hand-off to a thread, or one, not two (about 0.15 ms each on this machine's 2 cores).
        With *expect_missing* (a program is creating files in that directory) both go out
        pipelined, in one round trip; otherwise a name that is a file never pays a LIST,
        which costs more than a HEAD on AWS."""
        fast = self.fast_client

        async def _general() -> ObjectInfo | ListPage:
            info = await self.head(key, fast=False)
            return info if info is not None else await self.list_dir_probe(dir_prefix)

        if fast is None or not fast.enabled:
            return await _general()
        try:
            head, listed = await self._head_then_list(key, dir_prefix, expect_missing)
        except FastPathError as exc:
            log.debug("fast HEAD/LIST %s: %s; using the general client", key, exc)
            return await _general()
        info = self.info_from_headers(key, *head)
        if info is not None:
            return info
        assert listed is not None  # a 404 always comes with the LIST's answer
        return self._page(listed)

    async def _head_then_list(
        self, key: str, dir_prefix: str, together: bool
    ) -> tuple[tuple[int, dict[str, str]], dict[str, Any] | None]:
        """`FastClient.head_then_list` from the loop, else (or if that fails) in one
        worker-thread job."""
        loop = self.loop_requests()
        if loop is not None:
            try:
                return await loop.head_then_list(key, dir_prefix, together=together)
            except FastPathError as exc:
                log.debug("HEAD/LIST %s from the loop: %s; from a worker thread", key, exc)
        assert self.fast_client is not None
        return await trio.to_thread.run_sync(
            functools.partial(self.fast_client.head_then_list, key, dir_prefix, together=together),
            limiter=self._limiter,
        )

    async def list_dir_probe(self, dir_prefix: str) -> ListPage:
        """The first entry below *dir_prefix*: empty if no directory is there."""
        return await self.list_page(dir_prefix, None, delimiter="/", max_keys=1)

    @staticmethod
    def _page(r: dict[str, Any]) -> ListPage:
        """A ListObjectsV2 answer (fast path or boto3 form) as a `ListPage`."""
        files = [
            ObjectInfo(
                key=o["Key"],
                size=int(o.get("Size", 0)),
                etag=_etag(o.get("ETag")),
                last_modified_ns=o["LastModifiedNs"]
                if "LastModifiedNs" in o
                else from_datetime(o.get("LastModified")),
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
        return await self._put(key, len(data), lambda: data, metadata, content_type)

    async def _put(
        self,
        key: str,
        size: int,
        body: Callable[[], bytes],
        metadata: dict[str, str],
        content_type: str | None,
    ) -> str | None:
        """One PUT of the *size* bytes that *body* returns.

        Up to `LOOP_PUT_MAX` bytes it goes from the loop itself (plugin.fusefs.loopio; *body*
        then reads the cache file on the loop, as FUSE writes already write it there);
        larger, or if that fails, from a worker thread, where *body* runs too, so reading
        and sending cost one hand-off, not two."""
        fast = self.fast_client
        got: list[bytes] = []
        headers = [(META_PREFIX + k.lower(), v) for k, v in metadata.items()]
        if content_type:
            headers.append(("content-type", content_type))

        def _body() -> bytes:
            if not got:
                got.append(body())
            return got[0]

        async def _fast() -> str | None:
            assert fast is not None
            loop = self.loop_requests() if size <= LOOP_PUT_MAX else None
            if loop is not None:
                try:
                    return _etag(await loop.put_object(key, _body(), headers))
                except FastPathError as exc:
                    log.debug("PUT %s from the loop: %s; from a worker thread", key, exc)
            _, answer = await trio.to_thread.run_sync(
                lambda: fast.put_object(key, _body(), headers), limiter=self._limiter
            )
            return _etag(answer.get("etag"))

        async def _boto3() -> str | None:
            return await self._run(
                f"put {key}", lambda: self._put_sync(key, _body(), metadata, content_type)
            )

        usable = fast is not None and fast.enabled and size <= FAST_PUT_MAX
        with _put_not_found(key):
            return await fast_or_fallback_async(f"PUT {key}", _fast if usable else None, _boto3)

    def _put_sync(
        self, key: str, data: bytes, metadata: dict[str, str], content_type: str | None
    ) -> str | None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        kwargs["Metadata"] = metadata
        if content_type:
            kwargs["ContentType"] = content_type
        return _etag(self.client.put_object(**kwargs).get("ETag"))

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
        await self._ranged(ranged.fetch_into, key, start, end, fd, gaps, etag)

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
        await self._ranged(ranged.fetch_buffer, key, start, end, buf, etag, progress)

    async def _ranged(
        self, fetch: Callable[..., None], key: str, start: int, end: int, *args: Any
    ) -> None:
        """A ranged GET of `[start, end)` (plugin.fusefs.ranged) on the data threads."""
        what = f"get {key} [{start}, {end})"
        client, bucket = self.client, self.bucket
        await self._run(
            what, fetch, client, bucket, key, start, end, *args, _limiter=self._data_limiter
        )

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
        if size < config.multipart_threshold:
            return await self._put(
                key, size, functools.partial(_read_whole, fd, size), metadata, content_type
            )
        with _put_not_found(key):
            upload = functools.partial(
                upload_fd, part_size=config.part_size, concurrency=config.concurrency
            )
            what = f"multipart upload {key}"
            args = (self.client, self.bucket, key, fd, size, metadata, content_type)
            return _etag(await self._run(what, upload, *args))

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
