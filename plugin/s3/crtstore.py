"""The copy engine's fast ObjectStore: the hand-signed path (plugin.s3.fast) first, then the
CRT client when awscrt is installed, then boto3.

Which client serves which request, and why (docs/benchmarks.md, copy section, loopback
`rclone serve s3` on a 2-core VM):
- Whole GETs up to FAST_GET_MAX, pipelined batches of small GETs, ranged GETs up to
  FAST_RANGE_MAX, PUTs up to FAST_PUT_MAX, multipart create/part/complete and the list of
  uploads: the hand-signed path. 10,000 x 16 KiB down took 3.4 s (s5cmd 4.9 s); through
  the CRT the same copy took 8 s (its per-request buffer pool and callbacks into Python);
  a 1 GiB object in 8 MiB ranges received with one recv per range beat the CRT, which hands
  Python each part as a new bytes object (2.3-2.6 s unverified). Over plain HTTP, a range
  bound for a file (`FileSink`: no CRC on the way) is spliced from the socket into the file
  instead, never through user space (1.09-1.14 s -> 1.01-1.02 s for 1 GiB).
- HEAD, LIST, and GETs the fast path cannot take (over the limits above, AWS's own
  virtual-host endpoints, an endpoint with a path): the CRT when installed, else boto3.
- Bodies over FAST_PUT_MAX, list_parts, abort, delete_many: boto3. The CRT copies a request
  body into its own buffer: 8 MiB parts x 8 jobs took a 1 GiB upload to ~300 MiB RSS (boto3
  ~125 MiB) for no measurable speed-up (uploads are bound by MD5 and the server).
So awscrt earns its place only where the fast path cannot go; it is optional (the engine's
"auto" client uses this store either way), and without it boto3 serves those requests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from plugin.s3 import credentials as s3credentials
from plugin.s3 import xmldoc
from plugin.s3.dates import parse_http_date, seconds
from plugin.s3.errors import FastPathError
from plugin.s3.fallback import fast_or_fallback
from plugin.s3.fast import FastClient
from plugin.s3.metadata import canonical
from plugin.s3.settings import S3Settings
from plugin.s3.store import (
    CHECKSUM_MODE,
    FileSink,
    NoCredentialsError,
    ObjectInfo,
    PartInfo,
    Sink,
    UploadInfo,
    checksum_from_headers,
)

if TYPE_CHECKING:
    from plugin.s3.boto3store import Boto3Store
    from plugin.s3.crt import CrtClient

log = logging.getLogger(__name__)

#: Whole-object GETs up to this size go through the hand-signed path; larger bodies are
#: streamed by the general client instead of held in memory whole.
FAST_GET_MAX = 8 * 1024 * 1024
#: Ranged GETs (chunks of a large object) up to this size are read by the hand-signed path
#: straight into a per-thread buffer with one recv.
FAST_RANGE_MAX = 64 * 1024 * 1024
#: Bodies above this go up through boto3 (see the module doc).
FAST_PUT_MAX = 1024 * 1024
#: Former name of FAST_PUT_MAX.
CRT_PUT_MAX = FAST_PUT_MAX


def _crt_available() -> bool:
    try:
        import awscrt  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


class CrtStore:
    """ObjectStore: fast path, then CRT (if installed), then boto3 (created on first use)."""

    def __init__(
        self,
        settings: S3Settings | None = None,
        part_size: int = 8 * 1024 * 1024,
        *,
        use_crt: bool | None = None,
    ) -> None:
        settings = settings or S3Settings()
        endpoint_url, region = settings.endpoint_url, settings.region or "us-east-1"
        #: What the boto3 fallback is built from.
        self._settings = dataclasses.replace(settings, region=region)
        self._boto: Boto3Store | None = None
        self._boto_lock = threading.Lock()
        self.endpoint = endpoint_url or "AWS S3"
        self._crt: CrtClient | None = None
        keys: Callable[[], tuple[str, str, str | None]]
        if use_crt is None:
            use_crt = _crt_available()
        if use_crt:
            from plugin.s3.crt import CrtClient

            self._crt = CrtClient(
                endpoint_url,
                region,
                settings.profile,
                self._botocore_credentials,
                max_connections=settings.max_pool_connections,
                part_size=part_size,
            )
            keys = self._crt.keys
        else:
            keys = s3credentials.from_botocore(self._botocore_credentials())
        self._fast = _FastPath(endpoint_url, region, keys, settings.ca_bundle)

    def _botocore_credentials(self) -> Any:
        """botocore's chain answer (imports boto3); NoCredentialsError if it has none."""
        credentials = self._fallback()._client._request_signer._credentials
        if credentials is None:
            raise NoCredentialsError()
        return credentials

    def _fallback(self) -> Boto3Store:
        with self._boto_lock:
            if self._boto is None:
                from plugin.s3.boto3store import Boto3Store

                self._boto = Boto3Store(self._settings)
            return self._boto

    # ---------------------------------------------------------------- bytes

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        fast = self._fast.client(bucket)
        ranged = bool(start or length is not None)
        fast_get: Callable[[], ObjectInfo] | None = None
        if fast is not None and length and isinstance(sink, FileSink) and fast.splices:

            def fast_get() -> ObjectInfo:
                return self._splice_range(fast, bucket, key, sink, start, length)

        elif fast is not None and length and length <= FAST_RANGE_MAX:

            def fast_get() -> ObjectInfo:
                buf = self._fast.buffer(length)
                h = fast.get_range_into(key, start, buf)
                sink(start, buf)
                return _range_info(key, h)

        elif fast is not None and not ranged:

            def fast_get() -> ObjectInfo:
                status, h, body = fast.get_object(key, max_size=FAST_GET_MAX)
                if status == 404:
                    raise FastPathError(f"GET {key}: 404", "NoSuchKey")  # the general client says
                sink(0, memoryview(body))
                return _info(key, h)

        return fast_or_fallback(
            f"GET {key}", fast_get, lambda: self._general_get(bucket, key, sink, start, length)
        )

    def _splice_range(
        self, fast: FastClient, bucket: str, key: str, sink: FileSink, start: int, length: int
    ) -> ObjectInfo:
        """A range moved from the socket into the sink's file (no copy through user space,
        no buffer). A stream that breaks after some bytes landed is finished by the general
        client from there: the sink must not be handed those bytes twice."""
        landed = [0]

        def counted(n: int) -> None:
            landed[0] += n
            sink.landed(n)

        try:
            return _range_info(key, fast.get_range_to_file(key, start, length, sink.fd, counted))
        except FastPathError as exc:
            if not landed[0]:
                raise
            log.debug(
                "fast GET %s broke after %d bytes: %s; the rest by the general client",
                key,
                landed[0],
                exc,
            )
            rest = length - landed[0]
            return self._general_get(bucket, key, sink, start + landed[0], rest)

    def _general_get(
        self, bucket: str, key: str, sink: Sink, start: int, length: int | None
    ) -> ObjectInfo:
        if self._crt is None:
            return self._fallback().get(bucket, key, sink, start, length)
        from plugin.s3 import crt

        headers: list[tuple[str, str]] = []
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            headers.append(("Range", f"bytes={start}-{end}"))
        received = [0]

        def counting(offset: int, data: memoryview) -> None:
            received[0] += len(data)
            sink(offset, data)

        # A whole (small) object is one plain request: GET_OBJECT would split it into ranged
        # part requests, which answer 416 for an empty object. Ranges use GET_OBJECT, which
        # delivers each part as one buffer (one Python callback per chunk).
        whole = not headers
        if whole:
            headers.append(CHECKSUM_MODE)  # the stored CRC comes with a whole object
        _, h = self._crt.run(
            f"GET {key}",
            crt.DEFAULT if whole else crt.GET_OBJECT,
            "GET",
            self._crt.path(bucket, key),
            headers,
            sink=counting,
            operation="GetObject" if whole else None,
            observe_as="GetObject",
        )
        size = int(h.get("content-length", received[0]))
        content_range = h.get("content-range", "")
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            size = int(content_range.rsplit("/", 1)[1])
        want = size - start if length is None else length
        if not content_range and not start:
            want = size
        if received[0] != min(want, max(size - start, 0)):
            raise crt.CrtRequestError(
                f"GET {key}", "AWS_ERROR_S3_INCORRECT_CONTENT_LENGTH", 0, None
            )
        info = _info(key, h)
        return dataclasses.replace(info, size=size, checksum=info.checksum if whole else None)

    def close(self) -> None:
        """Close the fast path's sockets; the CRT client goes with garbage collection."""
        self._fast.close()

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        """Whole small objects in one pipelined exchange; None for any the caller must
        fetch with `get` (no fast path, an error, a body over *max_size*)."""
        fast = self._fast.client(bucket)
        if fast is None:
            return [None] * len(keys)
        out: list[tuple[ObjectInfo, bytes] | None] = []
        for key, got in zip(keys, fast.get_many(keys, max_size), strict=True):
            if isinstance(got, FastPathError) or got[0] != 200:
                out.append(None)
            else:
                out.append((_info(key, got[1]), got[2]))
        return out

    def put(self, bucket: str, key: str, data: bytes, metadata: Mapping[str, str]) -> str:
        meta = canonical(metadata)
        if len(data) > FAST_PUT_MAX:
            return self._fallback().put(bucket, key, data, meta)
        fast = self._fast.client(bucket)
        fast_put = None
        if fast is not None:

            def fast_put() -> str:
                return fast.put_object(key, data, _meta_headers(meta))[1].get("etag", "")

        return fast_or_fallback(
            f"PUT {key}", fast_put, lambda: self._general_put(bucket, key, data, meta)
        )

    def _general_put(self, bucket: str, key: str, data: bytes, meta: dict[str, str]) -> str:
        if self._crt is None:
            return self._fallback().put(bucket, key, data, meta)
        from plugin.s3 import crt

        _, h = self._crt.run(
            f"PUT {key}",
            crt.PUT_OBJECT,
            "PUT",
            self._crt.path(bucket, key),
            [(f"x-amz-meta-{k}", v) for k, v in meta.items()],
            body=data,
            observe_as="PutObject",
        )
        return h.get("etag", "")

    # ---------------------------------------------------------------- control plane

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        if self._crt is None:
            return self._fallback().head(bucket, key)
        from plugin.s3 import crt

        try:
            _, h = self._crt.run(
                f"HEAD {key}",
                crt.DEFAULT,
                "HEAD",
                self._crt.path(bucket, key),
                [CHECKSUM_MODE],
                operation="HeadObject",
            )
        except crt.CrtRequestError as exc:
            if exc.status == 404:
                return None
            raise
        return _info(key, h)

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        if self._crt is None:
            yield from self._fallback().list_objects(bucket, prefix)
            return
        from plugin.s3 import crt

        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if token:
                query["continuation-token"] = token
            body = bytearray()

            def sink(offset: int, data: memoryview, body: bytearray = body) -> None:
                body.extend(data)

            self._crt.run(
                f"LIST {bucket}/{prefix}",
                crt.DEFAULT,
                "GET",
                self._crt.bucket_path(bucket, query),
                [],
                sink=sink,
                operation="ListObjectsV2",
            )
            page = xmldoc.parse_list(bytes(body))
            for c in page["Contents"]:
                yield ObjectInfo(
                    key=c["Key"],
                    size=c["Size"],
                    etag=c["ETag"] or "",
                    last_modified=seconds(c["LastModifiedNs"]),
                )
            token = page["NextContinuationToken"]
            if not page["IsTruncated"] or not token:
                return

    # Multipart calls go the fast path when there is one (an upload then never imports
    # boto3, ~0.3 s), else boto3; list_parts and abort (resume only) always go boto3.

    def create_multipart(self, bucket: str, key: str, metadata: Mapping[str, str]) -> str:
        meta = canonical(metadata)
        fast = self._fast.client(bucket)
        return fast_or_fallback(
            f"CREATE UPLOAD {key}",
            None if fast is None else lambda: fast.create_multipart(key, _meta_headers(meta)),
            lambda: self._fallback().create_multipart(bucket, key, meta),
        )

    def list_uploads(self, bucket: str, key: str) -> list[UploadInfo]:
        fast = self._fast.client(bucket)

        def fast_list() -> list[UploadInfo]:
            assert fast is not None
            return [
                UploadInfo(upload_id=uid, initiated=seconds(initiated))
                for k, uid, initiated in fast.list_uploads(key)
                if k == key
            ]

        return fast_or_fallback(
            f"LIST UPLOADS {key}",
            None if fast is None else fast_list,
            lambda: self._fallback().list_uploads(bucket, key),
        )

    def list_parts(self, bucket: str, key: str, upload_id: str) -> dict[int, PartInfo]:
        return self._fallback().list_parts(bucket, key, upload_id)

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes, md5: bytes | None
    ) -> str:
        fast = self._fast.client(bucket)
        return fast_or_fallback(
            f"UPLOAD PART {number} of {key}",
            None if fast is None else lambda: fast.upload_part(key, upload_id, number, data, md5),
            lambda: self._fallback().upload_part(bucket, key, upload_id, number, data, md5),
        )

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str:
        fast = self._fast.client(bucket)
        return fast_or_fallback(
            f"COMPLETE UPLOAD {key}",
            None if fast is None else lambda: fast.complete_multipart(key, upload_id, parts),
            lambda: self._fallback().complete_multipart(bucket, key, upload_id, parts),
        )

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self._fallback().abort_multipart(bucket, key, upload_id)

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        self._fallback().delete_many(bucket, keys)

    def is_transient(self, exc: BaseException) -> bool:
        is_crt = getattr(exc, "is_transient", None)
        if callable(is_crt):  # a CrtRequestError
            return bool(is_crt())
        if self._boto is not None:
            return self._boto.is_transient(exc)
        return isinstance(exc, ConnectionError | TimeoutError)

    def is_unreachable(self, exc: BaseException) -> bool:
        if self._crt is not None:
            from plugin.s3 import crt

            if isinstance(exc, crt.CrtRequestError):
                return exc.name in crt.UNREACHABLE
        return self._boto is not None and self._boto.is_unreachable(exc)


class _FastPath:
    """One `FastClient` per bucket, for an explicit path-style endpoint (none for AWS's own
    virtual-hosted endpoints or an endpoint with a path: the general client handles those)."""

    #: Credentials are asked of the provider again after this many seconds (the providers
    #: behind it refresh role credentials well before they expire: botocore with 10 minutes
    #: left at the latest).
    REFRESH = 60.0

    def __init__(
        self,
        endpoint_url: str | None,
        region: str,
        keys: Callable[[], tuple[str, str, str | None]],
        ca_bundle: str | None,
    ) -> None:
        self._endpoint = endpoint_url
        parsed = urllib.parse.urlsplit(endpoint_url or "")
        if parsed.path not in ("", "/") or parsed.query:
            self._endpoint = None
        self._region = region
        self._keys = keys
        self._ca_bundle = ca_bundle
        self._clients: dict[str, FastClient] = {}
        self._lock = threading.Lock()
        self._creds: tuple[str, str, str | None] | None = None
        self._creds_at = 0.0
        self._local = threading.local()

    def _credentials(self) -> tuple[str, str, str | None]:
        import time

        with self._lock:
            if self._creds is None or time.monotonic() - self._creds_at > self.REFRESH:
                self._creds = self._keys()
                self._creds_at = time.monotonic()
            return self._creds

    def client(self, bucket: str) -> FastClient | None:
        if self._endpoint is None:
            return None
        with self._lock:
            fast = self._clients.get(bucket)
            if fast is None:
                try:
                    fast = FastClient(
                        self._endpoint,
                        bucket,
                        self._region,
                        self._credentials,
                        ca_bundle=self._ca_bundle,
                    )
                except ValueError:  # not an endpoint this path speaks to
                    self._endpoint = None
                    return None
                fast.whole_get_headers = [CHECKSUM_MODE]  # stored CRCs come with the body
                self._clients[bucket] = fast
        return fast if fast.enabled else None

    def buffer(self, size: int) -> memoryview:
        """This thread's receive buffer, at least *size* bytes (reused: no fresh pages)."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(size)
        return memoryview(buf)[:size]

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for fast in clients:
            fast.close()


def _meta_headers(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(f"x-amz-meta-{k}".lower(), v) for k, v in metadata.items()]


def _range_info(key: str, h: Mapping[str, str]) -> ObjectInfo:
    """ObjectInfo from the lower-cased headers of a ranged GET's answer: the object's size
    from Content-Range, and no checksum (a range's is not the object's)."""
    total = h.get("content-range", "").rsplit("/", 1)[-1]
    info = dataclasses.replace(_info(key, h), checksum=None)
    return dataclasses.replace(info, size=int(total)) if total.isdigit() else info


def _info(key: str, h: Mapping[str, str]) -> ObjectInfo:
    """ObjectInfo from lower-cased response headers."""
    return ObjectInfo(
        key=key,
        size=int(h.get("content-length", 0)),
        etag=h.get("etag", ""),
        last_modified=seconds(parse_http_date(h.get("last-modified"))),
        metadata={k[11:]: v for k, v in h.items() if k.startswith("x-amz-meta-")},
        checksum=checksum_from_headers(h),
    )
