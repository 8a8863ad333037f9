"""The fast byte path: GETs and small PUTs through the AWS CRT S3 client (`awscrt`).

Why: botocore spends milliseconds of Python CPU per request and moves bodies through Python in
small reads; the CRT client does HTTP, signing and body buffering in C on its own event-loop
threads and hands us whole parts (one callback per 8 MiB chunk). HEAD and LIST are done here
too, so a download never imports boto3 (~0.6 s of start-up per `stowage cp`, measured);
multipart bookkeeping and large upload bodies (see CRT_PUT_MAX) go through a boto3 store
created on first use.

Notes:
- boto3's own CRT integration ignores `endpoint_url` (perf-anchors §1.2), so requests are built
  here by hand: path-style `/bucket/key`, explicit Host header, TLS only for https endpoints.
- Credentials come from the environment or the shared files (`--profile`) through CRT's own
  providers; if those find none, from botocore's full chain (web identity, SSO, container
  credentials on ECS/EKS, the instance metadata service on EC2, ...) through a delegate that
  asks botocore at every signing, so role credentials are refreshed before they expire.
  Nothing is read from argv, and no credential source is ever switched off.
- CRT retries a failed part at most once (it delivers a part only when complete, so the
  engine's byte accounting stays exact); the engine's own retries and resume do the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as pyio
import logging
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from awscrt import auth, http, io, s3  # type: ignore[import-untyped]
from awscrt.exceptions import AwsCrtError  # type: ignore[import-untyped]

from plugin.s3fast import FastClient, FastPathError
from plugin.staging.store import (
    CHECKSUM_MODE,
    NoCredentialsError,
    ObjectInfo,
    PartInfo,
    Sink,
    UploadInfo,
    checksum_from_headers,
)

if TYPE_CHECKING:
    from plugin.staging.boto3store import Boto3Store

log = logging.getLogger(__name__)

#: CRT error names meaning the endpoint cannot be reached at all.
_UNREACHABLE = (
    "AWS_IO_SOCKET_CONNECTION_REFUSED",
    "AWS_IO_SOCKET_NO_ROUTE_TO_HOST",
    "AWS_IO_SOCKET_NETWORK_DOWN",
    "AWS_IO_SOCKET_TIMEOUT",
    "AWS_IO_DNS_INVALID_NAME",
    "AWS_IO_DNS_QUERY_FAILED",
)
#: Error name prefixes worth retrying (connection trouble of any kind).
_TRANSIENT_PREFIXES = ("AWS_IO_SOCKET_", "AWS_ERROR_HTTP_CONNECTION", "AWS_IO_DNS_")
_TRANSIENT_NAMES = (
    "AWS_ERROR_HTTP_CONNECTION_CLOSED",
    "AWS_ERROR_HTTP_SERVER_CLOSED",
    "AWS_ERROR_S3_SLOW_DOWN",
    "AWS_ERROR_S3_INTERNAL_ERROR",
    "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED",
    "AWS_ERROR_HTTP_RESPONSE_FIRST_BYTE_TIMEOUT_EXCEEDED",
    "AWS_ERROR_S3_INCORRECT_CONTENT_LENGTH",
)


#: Whole-object GETs up to this size go through the hand-signed path (plugin.s3fast): for
#: 10,000 x 16 KiB objects the CRT's per-request machinery (a buffer from its pool, callbacks
#: into Python from its threads) cost 8 s where s5cmd took 5 s; kept-alive sockets take 5 s.
#: Larger bodies are streamed by the CRT instead of held in memory whole.
FAST_GET_MAX = 8 * 1024 * 1024

#: Ranged GETs (chunks of a large object) up to this size are read by the hand-signed path
#: straight into a per-thread buffer with one recv (1 GiB from a loopback server: the CRT,
#: which hands Python each part as a new bytes object, took 2.3-2.6 s without verification).
FAST_RANGE_MAX = 64 * 1024 * 1024

#: Bodies above this go up through boto3. CRT copies a request body into its own buffer, so
#: 8 MiB parts x 8 jobs took the upload of a 1 GiB file to ~300 MiB RSS (boto3: ~125 MiB) for
#: no measurable speed-up: uploads here are bound by MD5 and the server, not by the client.
CRT_PUT_MAX = 1024 * 1024


class CrtRequestError(Exception):
    """A CRT request failed; carries what is needed to classify it."""

    def __init__(self, what: str, name: str, status: int, body: bytes | None) -> None:
        detail = ""
        if body:
            text = body.decode(errors="replace")
            start, end = text.find("<Code>"), text.find("</Code>")
            if start >= 0 and end > start:
                detail = f" {text[start + 6 : end]}"
        super().__init__(f"{what}: {name} (HTTP {status}){detail}")
        self.name = name
        self.status = status
        self.code = detail.strip()


class _Delegate:
    """Hands botocore's current credentials (standard chain, refreshed as needed) to CRT.

    Role credentials (container, instance metadata, assumed roles) are refreshable objects
    that expire: they are asked again at every call, never copied once."""

    def __init__(self, credentials: Any) -> None:
        self._creds = credentials

    def __call__(self) -> Any:
        frozen = self._creds.get_frozen_credentials()
        return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)


class CrtStore:
    """ObjectStore: CRT for bytes, HEAD and LIST; boto3 (lazily) for multipart bookkeeping."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_connections: int = 32,
        part_size: int = 8 * 1024 * 1024,
    ) -> None:
        region = region or "us-east-1"
        self._boto_args = (endpoint_url, region, profile, max_connections)
        self._boto: Boto3Store | None = None
        self._boto_lock = threading.Lock()
        self.endpoint = endpoint_url or "AWS S3"
        if endpoint_url:
            parsed = urllib.parse.urlsplit(endpoint_url)
            self._host = parsed.netloc
            tls = parsed.scheme == "https"
            self._base = parsed.path.rstrip("/")
        else:
            self._host = f"s3.{region}.amazonaws.com"
            tls = True
            self._base = ""
        elg = io.EventLoopGroup(2)
        bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
        provider = self._credentials(bootstrap, profile)
        self._fast = _FastPath(endpoint_url, region, provider)
        self._crt = s3.S3Client(
            bootstrap=bootstrap,
            region=region,
            tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
            signing_config=s3.create_default_s3_signing_config(
                region=region, credential_provider=provider
            ),
            part_size=part_size,
            # The engine bounds concurrency (jobs) and memory; CRT needs only as many
            # connections as requests we keep in flight.
            max_active_connections_override=max_connections,
            # max_retries=0 means "CRT default" (several retries with backoff: ~10 s per call
            # against a dead endpoint, measured); one quick retry, then the engine decides.
            retry_config=s3.S3RetryConfig(max_retries=1, fast_fail_if_no_token=True),
            connect_timeout_ms=5000,
            # CRT's buffer pool otherwise sizes itself for 10 Gb/s (GiBs); 256 MiB is its
            # minimum and far more than `jobs` chunks in flight need.
            memory_limit=256 * 1024 * 1024,
        )

    def _credentials(self, bootstrap: Any, profile: str | None) -> Any:
        """Environment, then the shared files; else botocore's whole chain (imports boto3):
        container credentials, the instance metadata service and the rest, as the
        environment configures them."""
        providers = [] if profile else [auth.AwsCredentialsProvider.new_environment()]
        with contextlib.suppress(RuntimeError):  # raised when there is no shared file
            providers.append(
                auth.AwsCredentialsProvider.new_profile(bootstrap, profile_name=profile)
            )
        if providers:
            chain = auth.AwsCredentialsProvider.new_chain(providers)
            try:
                chain.get_credentials().result(timeout=10)
                return chain
            except Exception:
                log.debug("no credentials in env/shared files; asking botocore's chain")
        credentials = self._fallback()._client._request_signer._credentials
        if credentials is None:
            raise NoCredentialsError()
        return auth.AwsCredentialsProvider.new_delegate(_Delegate(credentials))

    def _fallback(self) -> Boto3Store:
        with self._boto_lock:
            if self._boto is None:
                from plugin.staging.boto3store import Boto3Store

                self._boto = Boto3Store(*self._boto_args)
            return self._boto

    def _path(self, bucket: str, key: str, query: str = "") -> str:
        path = f"{self._base}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        return f"{path}?{query}" if query else path

    def _run(
        self,
        what: str,
        rtype: Any,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None = None,
        sink: Sink | None = None,
        operation: str | None = None,
    ) -> tuple[int, dict[str, str]]:
        hdrs = http.HttpHeaders([("Host", self._host), *headers])
        stream = None
        if body is not None:
            hdrs.add("Content-Length", str(len(body)))
            stream = pyio.BytesIO(body)
        request = http.HttpRequest(method, path, hdrs, stream)
        got: dict[str, Any] = {"status": 0, "headers": {}}
        failure: list[BaseException] = []
        handle: list[Any] = []

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            got["status"] = status_code
            got["headers"] = {k.lower(): v for k, v in headers}

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            if failure or sink is None:
                return
            try:
                sink(offset, memoryview(chunk))
            except BaseException as exc:  # cancel, bandwidth, disk full: stop the request
                failure.append(exc)
                if handle:
                    handle[0].cancel()

        def on_done(error_body: bytes | None = None, status_code: int = 0, **_: Any) -> None:
            got["error_body"] = error_body
            if status_code:
                got["status"] = status_code

        kwargs: dict[str, Any] = {
            "type": rtype,
            "request": request,
            "on_headers": on_headers,
            "on_done": on_done,
        }
        if sink is not None:
            kwargs["on_body"] = on_body
        if operation:
            kwargs["operation_name"] = operation
        req = self._crt.make_request(**kwargs)
        handle.append(req)
        try:
            req.finished_future.result()
        except AwsCrtError as exc:
            if failure:
                raise failure[0] from None
            status = int(got["status"]) or 0
            raise CrtRequestError(what, exc.name, status, got.get("error_body")) from None
        finally:
            # Break the request <-> callback cycle now: left to the cyclic GC, 10,000 small
            # requests kept ~250 MiB of native buffers alive (measured).
            handle.clear()
            del req, kwargs, request
        if failure:
            raise failure[0]
        return int(got["status"]), got["headers"]

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        headers: list[tuple[str, str]] = []
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            headers.append(("Range", f"bytes={start}-{end}"))
        fast = self._fast.client(bucket)
        if fast is not None and length and length <= FAST_RANGE_MAX:
            buf = self._fast.buffer(length)
            try:
                h = fast.get_range_into(key, start, buf)
            except FastPathError as exc:
                log.debug("fast ranged GET %s: %s; using CRT", key, exc)
            else:
                sink(start, buf)
                total = h.get("content-range", "").rsplit("/", 1)[-1]
                info = dataclasses.replace(_info(key, h), checksum=None)  # a range's: none
                return dataclasses.replace(info, size=int(total)) if total.isdigit() else info
        elif fast is not None and not headers:
            try:
                status, h, body = fast.get_object(key, max_size=FAST_GET_MAX)
            except FastPathError as exc:
                log.debug("fast GET %s: %s; using CRT", key, exc)
            else:
                if status == 404:
                    raise CrtRequestError(
                        f"GET {key}", "AWS_ERROR_S3_INVALID_RESPONSE_STATUS", 404, body
                    )
                sink(0, memoryview(body))
                return _info(key, h)
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
        _, h = self._run(
            f"GET {key}",
            s3.S3RequestType.DEFAULT if whole else s3.S3RequestType.GET_OBJECT,
            "GET",
            self._path(bucket, key),
            headers,
            sink=counting,
            operation="GetObject" if whole else None,
        )
        size = int(h.get("content-length", received[0]))
        content_range = h.get("content-range", "")
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            size = int(content_range.rsplit("/", 1)[1])
        want = size - start if length is None else length
        if not content_range and not start:
            want = size
        if received[0] != min(want, max(size - start, 0)):
            raise CrtRequestError(f"GET {key}", "AWS_ERROR_S3_INCORRECT_CONTENT_LENGTH", 0, None)
        meta = {k[len("x-amz-meta-") :]: v for k, v in h.items() if k.startswith("x-amz-meta-")}
        last = h.get("last-modified")
        return ObjectInfo(
            key=key,
            size=size,
            etag=h.get("etag", ""),
            last_modified=parsedate_to_datetime(last).timestamp() if last else 0.0,
            metadata=meta,
            checksum=checksum_from_headers(h) if whole else None,
        )

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
        if len(data) > CRT_PUT_MAX:
            return self._fallback().put(bucket, key, data, metadata)
        fast = self._fast.client(bucket)
        if fast is not None:
            meta = [(f"x-amz-meta-{k}".lower(), v) for k, v in metadata.items()]
            try:
                return fast.put_object(key, data, meta)[1].get("etag", "")
            except FastPathError as exc:
                log.debug("fast PUT %s: %s; using CRT", key, exc)
        headers = [(f"x-amz-meta-{k}", v) for k, v in metadata.items()]
        _, h = self._run(
            f"PUT {key}",
            s3.S3RequestType.PUT_OBJECT,
            "PUT",
            self._path(bucket, key),
            headers,
            body=data,
        )
        return h.get("etag", "")

    # ---------------------------------------------------------------- control plane

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            _, h = self._run(
                f"HEAD {key}",
                s3.S3RequestType.DEFAULT,
                "HEAD",
                self._path(bucket, key),
                [CHECKSUM_MODE],
                operation="HeadObject",
            )
        except CrtRequestError as exc:
            if exc.status == 404:
                return None
            raise
        return _info(key, h)

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if token:
                query["continuation-token"] = token
            body = bytearray()

            def sink(offset: int, data: memoryview, body: bytearray = body) -> None:
                body.extend(data)

            self._run(
                f"LIST {bucket}/{prefix}",
                s3.S3RequestType.DEFAULT,
                "GET",
                f"{self._base}/{bucket}?{urllib.parse.urlencode(query, quote_via=_quote)}",
                [],
                sink=sink,
                operation="ListObjectsV2",
            )
            root = ET.fromstring(bytes(body))
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
            for c in root.iter(f"{ns}Contents"):
                key = c.findtext(f"{ns}Key") or ""
                modified = c.findtext(f"{ns}LastModified") or ""
                yield ObjectInfo(
                    # encoding-type=url is form encoding: "+" is a space, "%2B" a plus.
                    key=urllib.parse.unquote_plus(key) if encoded else key,
                    size=int(c.findtext(f"{ns}Size") or 0),
                    etag=c.findtext(f"{ns}ETag") or "",
                    last_modified=_iso_ts(modified),
                )
            token = root.findtext(f"{ns}NextContinuationToken")
            if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true" or not token:
                return

    # Multipart calls go the fast path when there is one (an upload then never imports
    # boto3, ~0.3 s), else boto3; list_parts and abort (resume only) always go boto3.

    def create_multipart(self, bucket: str, key: str, metadata: Mapping[str, str]) -> str:
        fast = self._fast.client(bucket)
        if fast is not None:
            meta = [(f"x-amz-meta-{k}".lower(), v) for k, v in metadata.items()]
            try:
                return fast.create_multipart(key, meta)
            except FastPathError as exc:
                log.debug("fast CREATE UPLOAD %s: %s; using boto3", key, exc)
        return self._fallback().create_multipart(bucket, key, metadata)

    def list_uploads(self, bucket: str, key: str) -> list[UploadInfo]:
        fast = self._fast.client(bucket)
        if fast is not None:
            try:
                return [
                    UploadInfo(upload_id=uid, initiated=_iso_ts(initiated))
                    for k, uid, initiated in fast.list_uploads(key)
                    if k == key
                ]
            except FastPathError as exc:
                log.debug("fast LIST UPLOADS %s: %s; using boto3", key, exc)
        return self._fallback().list_uploads(bucket, key)

    def list_parts(self, bucket: str, key: str, upload_id: str) -> dict[int, PartInfo]:
        return self._fallback().list_parts(bucket, key, upload_id)

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes, md5: bytes | None
    ) -> str:
        fast = self._fast.client(bucket)
        if fast is not None:
            try:
                return fast.upload_part(key, upload_id, number, data, md5)
            except FastPathError as exc:
                log.debug("fast UPLOAD PART %d of %s: %s; using boto3", number, key, exc)
        return self._fallback().upload_part(bucket, key, upload_id, number, data, md5)

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str:
        fast = self._fast.client(bucket)
        if fast is not None:
            try:
                return fast.complete_multipart(key, upload_id, parts)
            except FastPathError as exc:
                log.debug("fast COMPLETE UPLOAD %s: %s; using boto3", key, exc)
        return self._fallback().complete_multipart(bucket, key, upload_id, parts)

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self._fallback().abort_multipart(bucket, key, upload_id)

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        self._fallback().delete_many(bucket, keys)

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, CrtRequestError):
            if exc.status >= 500 or exc.status in (408, 429):
                return True
            return exc.name in _TRANSIENT_NAMES or exc.name.startswith(_TRANSIENT_PREFIXES)
        if self._boto is not None:
            return self._boto.is_transient(exc)
        return isinstance(exc, ConnectionError | TimeoutError)

    def is_unreachable(self, exc: BaseException) -> bool:
        if isinstance(exc, CrtRequestError):
            return exc.name in _UNREACHABLE
        return self._boto is not None and self._boto.is_unreachable(exc)


class _FastPath:
    """One `FastClient` per bucket, for an explicit path-style endpoint (none for AWS's own
    virtual-hosted endpoints or an endpoint with a path: the CRT handles those)."""

    #: Credentials are asked of the CRT provider again after this many seconds (the providers
    #: behind it refresh role credentials well before they expire: botocore with 10 minutes
    #: left at the latest).
    REFRESH = 60.0

    def __init__(self, endpoint_url: str | None, region: str, provider: Any) -> None:
        self._endpoint = endpoint_url
        parsed = urllib.parse.urlsplit(endpoint_url or "")
        if parsed.path not in ("", "/") or parsed.query:
            self._endpoint = None
        self._region = region
        self._provider = provider
        self._clients: dict[str, FastClient] = {}
        self._lock = threading.Lock()
        self._creds: tuple[str, str, str | None] | None = None
        self._creds_at = 0.0
        self._local = threading.local()

    def _credentials(self) -> tuple[str, str, str | None]:
        with self._lock:
            if self._creds is None or time.monotonic() - self._creds_at > self.REFRESH:
                c = self._provider.get_credentials().result(timeout=10)
                self._creds = (c.access_key_id, c.secret_access_key, c.session_token)
                self._creds_at = time.monotonic()
            return self._creds

    def client(self, bucket: str) -> FastClient | None:
        if self._endpoint is None:
            return None
        with self._lock:
            fast = self._clients.get(bucket)
            if fast is None:
                try:
                    fast = FastClient(self._endpoint, bucket, self._region, self._credentials)
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


def _quote(text: str | bytes, safe: str | bytes = "", *args: Any) -> str:
    """Query values for SigV4: everything but unreserved characters percent-encoded."""
    return urllib.parse.quote(text, safe="-_.~")


def _iso_ts(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _info(key: str, h: Mapping[str, str]) -> ObjectInfo:
    """ObjectInfo from lower-cased response headers."""
    last = h.get("last-modified")
    return ObjectInfo(
        key=key,
        size=int(h.get("content-length", 0)),
        etag=h.get("etag", ""),
        last_modified=parsedate_to_datetime(last).timestamp() if last else 0.0,
        metadata={k[11:]: v for k, v in h.items() if k.startswith("x-amz-meta-")},
        checksum=checksum_from_headers(h),
    )
