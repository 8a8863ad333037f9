"""The fast S3 operations: SigV4-signed HEAD, LIST, GET, PUT and the multipart calls over
kept-alive sockets, without botocore or the CRT.

Why: per-object requests dominate two workloads. Listing a directory in the S3 filesystem
HEADs every entry for its s3fs metadata, and botocore spends over a millisecond of CPU per
request (endpoint rules, event hooks, response parsing) where the server answers in tens of
microseconds. The copy core moves 10,000 small objects, where the CRT client's per-request
machinery (buffer pool, callbacks into Python from its threads) cost more than the transfer.
A hand-signed request costs a fraction of either. This path is an optimisation only:
path-style endpoints, bodies held in memory, and anything unexpected raises `FastPathError`
so the caller uses its general client (`plugin.s3.fallback`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

from plugin.s3 import xmldoc
from plugin.s3.credentials import from_botocore
from plugin.s3.errors import FastPathError
from plugin.s3.observe import observed, record
from plugin.s3.sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    Credentials,
    Signer,
    object_path,
)
from plugin.s3.transport import (
    Conn,
    SplicePipe,
    Transport,
    answer_outcome,
    read_exact,
    splice_exact,
)

log = logging.getLogger(__name__)

__all__ = [
    "EMPTY_SHA256",
    "Credentials",
    "FastClient",
    "FastPathError",
    "from_boto3_client",
    "read_exact",
]

#: Give up on the fast path after this many transport failures in a row.
MAX_FAILURES = 3
#: Least seconds the answers after the first of an unproven pipelined batch may take.
PIPELINE_TRIAL_TIMEOUT = 1.0

_REQUEST_ERRORS = frozenset(
    {
        "BadDigest",
        "EntityTooLarge",
        "EntityTooSmall",
        "IncompleteBody",
        "InvalidDigest",
        "InvalidPart",
        "InvalidPartOrder",
        "InvalidRange",
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "RequestTimeout",
    }
)


class FastClient(Transport):
    """Signed S3 requests for one bucket; thread-safe (one kept-alive connection per thread)."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        region: str,
        credentials: Credentials,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        ca_bundle: str | None = None,
    ) -> None:
        url = urlsplit(endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"unsupported endpoint {endpoint_url!r}")
        if url.path not in ("", "/") or url.query:
            raise ValueError(f"endpoint with a path {endpoint_url!r}")
        https = url.scheme == "https"
        super().__init__(
            url.hostname,
            url.port or (443 if https else 80),
            https=https,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            ca_bundle=ca_bundle,
        )
        self.netloc = url.netloc
        self.bucket = bucket
        self.region = region
        self.credentials = credentials
        self.signer = Signer(url.netloc, region, credentials)
        self.enabled = True
        #: Extra headers (lower-case names) of whole-object GETs (`get_object`, `get_many`),
        #: e.g. [("x-amz-checksum-mode", "ENABLED")] for the stored CRC in the answer.
        self.whole_get_headers: list[tuple[str, str]] = []
        #: False once a pipelined batch broke (some servers drop what follows a request).
        self.pipelining = True
        #: True once a pipelined batch was answered whole. Until then the answers after a
        #: batch's first get `_trial_timeout`: moto's server answers only the first request
        #: of a batch and then waits, and 30 tiny GETs took the whole read timeout (60 s).
        self.pipelining_proven = False
        self._failures = 0

    def request_bytes(
        self,
        key: str,
        now: float | None = None,
        *,
        method: str = "HEAD",
        query: dict[str, str] | None = None,
        headers: list[tuple[str, str]] | None = None,
        payload_hash: str = EMPTY_SHA256,
    ) -> bytes:
        """The signed request head for *key* (public for tests). Every header is signed;
        *headers* names must be lower case."""
        return self.signer.request_head(
            method,
            object_path(self.bucket, key),
            query=query,
            headers=headers,
            payload_hash=payload_hash,
            now=now,
        )

    def list_v2(
        self, prefix: str, token: str | None, delimiter: str | None, max_keys: int
    ) -> dict[str, Any]:
        """ListObjectsV2, parsed like botocore does (the keys this module's caller uses):
        Contents [Key, Size, ETag, LastModified ns], CommonPrefixes [Prefix], IsTruncated,
        NextContinuationToken. Blocking; FastPathError for anything unexpected."""
        if not self.enabled:
            raise FastPathError("disabled")
        status, _headers, body = self._call(
            "LIST", self.list_request(prefix, token, delimiter, max_keys)
        )
        return self.listed(status, body)

    def list_request(
        self, prefix: str, token: str | None, delimiter: str | None, max_keys: int
    ) -> bytes:
        query = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys)}
        query["prefix"] = prefix
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        return self.request_bytes("", method="GET", query=query)

    def listed(self, status: int, body: bytes) -> dict[str, Any]:
        """A LIST answer parsed (see `list_v2`); FastPathError unless it is a 200."""
        if status != 200:
            self._refused(status)
            raise FastPathError(f"LIST HTTP {status}", status=status)
        return xmldoc.parse_list(body)

    def head_then_list(
        self, key: str, prefix: str, *, together: bool
    ) -> tuple[tuple[int, dict[str, str]], dict[str, Any] | None]:
        """What a name is: HEAD *key* (as `head` answers it) and, only if that is a 404, the
        first entry below *prefix* (as `list_v2` answers it); None when the HEAD found one.

        With *together*, on a server that pipelines, both requests go out at once: one
        round trip. The LIST's answer is then read and dropped if the HEAD found an object,
        so the caller asks for it only when a 404 is likely (a program creating files)."""
        if not (together and self.enabled and self.keepalive and self.pipelining):
            answer = self.head(key)
            return answer, None if answer[0] != 404 else self.list_v2(prefix, None, "/", 1)
        conn = self._live_conn()
        reused = conn is not None
        first_answered = False
        sent = time.monotonic()
        try:
            if conn is None:
                conn = self._local.conn = self._connect()
            conn.sock.sendall(self.request_bytes(key) + self.list_request(prefix, None, "/", 1))
            status, headers = self._read_response(conn)
            first_answered = True
            self._trial_timeout(conn, sent)
            list_status, list_headers = self._read_response(conn)
            body = self._read_body(conn, list_headers)
            self._trial_passed(conn, 2)
            if not conn.reusable:
                self._drop()
        except (OSError, ValueError, FastPathError) as exc:
            self._drop()
            record("HeadObject", "error", time.monotonic() - sent)
            if first_answered or not reused:
                # Not a kept-alive connection the server had closed: it does not pipeline.
                self.pipelining = False
            log.debug("pipelined HEAD and LIST fell back to single requests: %s", exc)
            return self.head_then_list(key, prefix, together=False)
        elapsed = time.monotonic() - sent
        record("HeadObject", answer_outcome(status), elapsed)
        record("ListObjectsV2", answer_outcome(list_status, body), elapsed)
        self.head_answer(status)
        if status != 404:
            return (status, headers), None
        return (status, headers), self.listed(list_status, body)

    def get_object(self, key: str, max_size: int) -> tuple[int, dict[str, str], bytes]:
        """GET a whole (small) object: (status, lower-cased headers, body). 200 and 404 come
        back; anything else, or a body over *max_size*, raises FastPathError."""
        if not self.enabled:
            raise FastPathError("disabled")
        request = self.request_bytes(key, method="GET", headers=self.whole_get_headers)
        status, answer, body = self._call("GET", request, max_body=max_size)
        if status not in (200, 404):
            self._refused(status)
            raise FastPathError(f"GET HTTP {status}", status=status)
        return status, answer, body

    def get_many(
        self, keys: list[str], max_size: int
    ) -> list[tuple[int, dict[str, str], bytes] | FastPathError]:
        """GET several whole (small) objects, pipelined on this thread's connection: one
        send for all requests, answers read back to back. Each result is what `get_object`
        returns or raises; after a broken connection the rest fail with FastPathError, for
        the caller's own path."""
        if not self.enabled or not (self.keepalive and self.pipelining):
            return [FastPathError("no pipelining") for _ in keys]
        out: list[tuple[int, dict[str, str], bytes] | FastPathError] = []
        conn = self._live_conn()
        sent = time.monotonic()
        try:
            if conn is None:
                conn = self._local.conn = self._connect()
            sent = time.monotonic()
            conn.sock.sendall(
                b"".join(
                    self.request_bytes(k, method="GET", headers=self.whole_get_headers)
                    for k in keys
                )
            )
            for _ in keys:
                if len(out) == 1:
                    self._trial_timeout(conn, sent)
                status, answer = self._read_response(conn)
                body = self._read_body(conn, answer, max_size)
                record("GetObject", answer_outcome(status, body), time.monotonic() - sent)
                if status not in (200, 404):
                    self._refused(status)
                    out.append(FastPathError(f"GET HTTP {status}", status=status))
                else:
                    out.append((status, answer, body))
            self._trial_passed(conn, len(keys))
            if not conn.reusable:
                self._drop()
        except (OSError, ValueError, FastPathError) as exc:
            self._drop()
            if out or len(keys) > 1:
                log.debug("pipelined GETs broke after %d answers: %s", len(out), exc)
            if out and not self.pipelining_proven:
                self.pipelining = False
            record("GetObject", "error", time.monotonic() - sent)
            out += [FastPathError(f"GET transport: {exc}")] * (len(keys) - len(out))
        return out

    def get_range_into(
        self, key: str, start: int, view: memoryview, etag: str | None = None
    ) -> dict[str, str]:
        """GET bytes `[start, start + len(view))` of *key* into *view*; returns the answer's
        lower-cased headers. Anything but an answer for exactly that range (a missing object, a
        changed ETag, a server that ignored Range, a broken stream) raises FastPathError, and
        the caller asks its general client."""
        if not self.enabled:
            raise FastPathError("disabled")
        with observed("GetObject"):
            return self._get_range_into(key, start, view, etag)

    def _get_range_into(
        self, key: str, start: int, view: memoryview, etag: str | None
    ) -> dict[str, str]:
        end = start + len(view) - 1
        extra = [("range", f"bytes={start}-{end}")]
        if etag:
            extra.append(("if-match", f'"{etag}"'))
        request = self.request_bytes(key, method="GET", headers=extra)
        conn, status, headers = self._send("GET", request)
        self._check_range(key, start, len(view), status, headers)
        if etag and headers.get("etag", "").strip('"') not in ("", etag):
            self._drop()  # a server that ignores If-Match (rclone) sent another version
            raise FastPathError(f"GET {key}: the object changed on the server")
        try:
            n = read_exact(conn.rfile, conn.sock, view)
        except (OSError, ValueError) as exc:
            self._drop()
            raise FastPathError(f"GET transport: {exc}") from exc
        if n != len(view):
            self._drop()
            raise FastPathError(f"GET {key}: body ended after {n} of {len(view)} bytes")
        if not conn.reusable:
            self._drop()
        return headers

    @property
    def splices(self) -> bool:
        """Whether `get_range_to_file` can splice: plain HTTP on a system with splice(2)."""
        return self.tls_context is None and hasattr(os, "splice")

    def get_range_to_file(
        self, key: str, start: int, length: int, fd: int, landed: Callable[[int], None]
    ) -> dict[str, str]:
        """GET bytes `[start, start + length)` of *key* into file *fd* at offset *start* with
        splice(2) (`splices` must be true); *landed*(n) after each piece is in the file.
        Returns the answer's lower-cased headers. Anything but an answer for exactly that
        range raises FastPathError, after *landed* reported what is already in the file."""
        if not self.enabled:
            raise FastPathError("disabled")
        with observed("GetObject"):
            end = start + length - 1
            request = self.request_bytes(
                key, method="GET", headers=[("range", f"bytes={start}-{end}")]
            )
            conn, status, headers = self._send("GET", request)
            self._check_range(key, start, length, status, headers)
            pipe: SplicePipe | None = getattr(self._local, "pipe", None)
            if pipe is None:
                pipe = self._local.pipe = SplicePipe()
            try:
                n = splice_exact(conn.rfile, conn.sock, pipe.fds, fd, start, length, landed)
            except BaseException:  # the connection's (FastPathError) or the file's (OSError)
                self._local.pipe = None  # it may hold bytes of the broken stream
                self._drop()
                raise
            if n != length:
                self._drop()
                raise FastPathError(f"GET {key}: body ended after {n} of {length} bytes")
            if not conn.reusable:
                self._drop()
            return headers

    def _check_range(
        self, key: str, start: int, length: int, status: int, headers: dict[str, str]
    ) -> None:
        """FastPathError (the connection dropped, the body unread) unless the answer is for
        exactly bytes `[start, start + length)`."""
        end = start + length - 1
        answered = headers.get("content-range", "")
        if (
            status not in (200, 206)  # rclone answers 200 with the Content-Range asked for
            or not answered.startswith(f"bytes {start}-{end}/")
            or headers.get("content-length") != str(length)
        ):
            self._drop()  # the body (if any) stays unread
            self._refused(status)
            raise FastPathError(
                f"GET {key} [{start}, {end}]: HTTP {status} {answered!r}", status=status
            )

    def put_object(
        self, key: str, body: bytes, headers: list[tuple[str, str]], md5: bytes | None = None
    ) -> tuple[int, dict[str, str]]:
        """PUT a (small) object with *headers* (lower-case names, e.g. x-amz-meta-*); *md5*
        is the body's digest if the caller has it. 200 comes back; anything else raises."""
        return self._put("PUT", key, None, body, headers, md5 or hashlib.md5(body).digest())

    def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes, md5: bytes | None = None
    ) -> str:
        """UploadPart; the part's ETag. Without *md5* the server checks only the length."""
        query = {"partNumber": str(number), "uploadId": upload_id}
        _, answer = self._put(f"UPLOAD PART {number}", key, query, body, [], md5)
        return answer.get("etag", "")

    def _put(
        self,
        what: str,
        key: str,
        query: dict[str, str] | None,
        body: bytes,
        headers: list[tuple[str, str]],
        md5: bytes | None,
    ) -> tuple[int, dict[str, str]]:
        """See `put_request`."""
        if not self.enabled:
            raise FastPathError("disabled")
        head = self.put_request(key, body, headers, md5, query)
        status, answer, reply = self._call(what, head, payload=body)
        self.put_answer(what, status, reply)
        return status, answer

    # -- multipart control plane -------------------------------------------------------------

    def create_multipart(self, key: str, headers: list[tuple[str, str]]) -> str:
        """CreateMultipartUpload; its UploadId."""
        root = self._xml_call("CREATE UPLOAD", key, "POST", {"uploads": ""}, headers=headers)
        upload_id = root.findtext(f"{xmldoc.ns(root)}UploadId")  # rclone names the root differently
        if not upload_id:
            raise FastPathError(f"CREATE UPLOAD: no UploadId in {root.tag}")
        return upload_id

    def list_uploads(self, prefix: str) -> list[tuple[str, str, int]]:
        """(key, upload id, initiated ns) of the first 1,000 uploads in progress under
        *prefix*."""
        root = self._xml_call(
            "LIST UPLOADS", "", "GET", {"uploads": "", "prefix": prefix}, none_if="NoSuchUpload"
        )
        if root.tag == "none":  # rclone's answer when there are none
            return []
        return xmldoc.parse_uploads(root)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        """CompleteMultipartUpload; the object's ETag. An error in a 200 answer raises."""
        root = self._xml_call(
            "COMPLETE UPLOAD",
            key,
            "POST",
            {"uploadId": upload_id},
            payload=xmldoc.complete_body(parts),
        )
        return root.findtext(f"{xmldoc.ns(root)}ETag") or ""

    def _xml_call(
        self,
        what: str,
        key: str,
        method: str,
        query: dict[str, str],
        *,
        headers: list[tuple[str, str]] | None = None,
        payload: bytes = b"",
        none_if: str | None = None,
    ) -> ElementTree.Element:
        """One signed request whose answer is an XML document; its root. An S3 error (in any
        status, 200 included) raises, unless its code is *none_if*: then a root tagged
        "none" comes back."""
        if not self.enabled:
            raise FastPathError("disabled")
        headers = [*(headers or []), ("content-length", str(len(payload)))]
        request = self.request_bytes(
            key,
            method=method,
            query=query,
            headers=headers,
            payload_hash=hashlib.sha256(payload).hexdigest(),
        )
        status, _, body = self._call(what, request, payload=payload, max_body=16 << 20)
        root = xmldoc.xml_root(body)
        code = xmldoc.error_of(root)[0]
        if code and code == none_if:
            return ElementTree.Element("none")
        if code or status != 200 or root is None:
            self._refused(status, code)
            raise FastPathError(f"{what}: HTTP {status} {code}", code, status=status)
        return root

    def _refused(self, status: int, code: str = "") -> None:
        if status in (400, 403) and code not in _REQUEST_ERRORS:
            # The server does not like our signing (or this path): stop trying it.
            self.enabled = False
            log.info("fast S3 path refused by the server (HTTP %d); using the full client", status)

    def _exchange(self, request: bytes) -> tuple[int, dict[str, str]]:
        status, headers, _ = self._call("HEAD", request, body=False)
        return status, headers

    def head_many(
        self, keys: list[str], window: int = 16
    ) -> list[tuple[int, dict[str, str]] | FastPathError]:
        """HEAD several keys over this thread's connection, pipelined *window* at a time
        (no round trip per request). Each result is what `head` returns or raises; keys
        after a broken connection fail with FastPathError, for the caller's fallback."""
        out: list[tuple[int, dict[str, str]] | FastPathError] = []
        i = 0
        while i < len(keys):
            if not self.enabled:
                out += [FastPathError("disabled")] * (len(keys) - i)
                break
            batch = keys[i : i + (window if self.keepalive and self.pipelining else 1)]
            conn = self._live_conn()
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                conn.sock.sendall(b"".join(self.request_bytes(k) for k in batch))
                answers = [self._read_response(conn)]
                if len(batch) > 1:
                    self._trial_timeout(conn, sent)
                answers += [self._read_response(conn) for _ in batch[1:]]
                self._trial_passed(conn, len(batch))
                if not conn.reusable:
                    self._drop()
            except (OSError, ValueError, FastPathError) as exc:
                self._drop()
                record("HeadObject", "error", time.monotonic() - sent)
                if len(batch) > 1:
                    self.pipelining = False
                # Once more, one by one on a fresh connection (a kept-alive one may have
                # been closed by the server meanwhile).
                for k in batch:
                    try:
                        out.append(self.head(k))
                    except FastPathError as err:
                        out.append(err)
                log.debug("pipelined HEADs fell back to single requests: %s", exc)
                i += len(batch)
                continue
            elapsed = time.monotonic() - sent
            for status, headers in answers:
                record("HeadObject", answer_outcome(status), elapsed)
                if status in (400, 403):
                    self.enabled = False
                    log.info("fast HEAD path refused by the server (HTTP %d)", status)
                if status not in (200, 404):
                    out.append(FastPathError(f"HTTP {status}", status=status))
                else:
                    out.append((status, headers))
            self._failures = 0
            i += len(batch)
        return out

    def _trial_timeout(self, conn: Conn, sent: float) -> None:
        """The first answer of a pipelined batch is in: while pipelining is unproven, the
        rest must follow within 1 s or four times that answer's wait, whichever is longer."""
        if not self.pipelining_proven:
            wait = max(PIPELINE_TRIAL_TIMEOUT, 4 * (time.monotonic() - sent))
            conn.sock.settimeout(min(wait, self.read_timeout))

    def _trial_passed(self, conn: Conn, answered: int) -> None:
        if not self.pipelining_proven and answered > 1:
            self.pipelining_proven = True
            conn.sock.settimeout(self.read_timeout)

    def head(self, key: str) -> tuple[int, dict[str, str]]:
        """(status, lower-cased headers) of HEAD *key*. Blocking: call from a worker thread.

        Only 200 and 404 come back; other answers raise `FastPathError`, and 400/403 (the
        server does not like our signing) or repeated transport errors switch it off."""
        if not self.enabled:
            raise FastPathError("disabled")
        try:
            status, headers = self._exchange(self.request_bytes(key))
        except FastPathError:
            self._failures += 1
            if self._failures >= MAX_FAILURES and self.enabled:
                self.enabled = False
                log.info("fast HEAD path off after %d failures; using boto3", self._failures)
            raise
        self._failures = 0
        self.head_answer(status)
        return status, headers

    def head_answer(self, status: int) -> None:
        """Check a HEAD's status: 200 and 404 pass; 400/403 (the server does not like our
        signing) switch the fast path off; every other status raises `FastPathError`."""
        if status in (400, 403):
            self.enabled = False
            log.info("fast HEAD path refused by the server (HTTP %d); using boto3", status)
            raise FastPathError(f"HTTP {status}", status=status)
        if status not in (200, 404):
            raise FastPathError(f"HTTP {status}", status=status)

    def put_request(
        self,
        key: str,
        body: bytes,
        headers: list[tuple[str, str]],
        md5: bytes | None,
        query: dict[str, str] | None = None,
    ) -> bytes:
        """The signed head of a PUT of *body* (the payload is not signed: UNSIGNED-PAYLOAD;
        the server checks Content-MD5 instead, so the body is hashed once, not twice)."""
        headers = [*headers, ("content-length", str(len(body)))]
        if md5 is not None:
            headers.append(("content-md5", base64.b64encode(md5).decode()))
        return self.request_bytes(
            key, method="PUT", query=query, headers=headers, payload_hash=UNSIGNED_PAYLOAD
        )

    def put_answer(self, what: str, status: int, reply: bytes) -> None:
        """Check a PUT's answer: anything but 200 raises `FastPathError`."""
        if status != 200:
            code = xmldoc.error_code(reply)
            self._refused(status, code)
            raise FastPathError(f"{what}: HTTP {status} {code}", code, status=status)


def from_boto3_client(client: Any, bucket: str, **timeouts: float) -> FastClient | None:
    """A FastClient with the boto3 client's endpoint, region and credentials, or None if
    that client is not one this path can imitate (virtual-host style, anonymous, ...)."""
    try:
        meta = client.meta
        style = (meta.config.s3 or {}).get("addressing_style")
        creds = client._request_signer._credentials
        endpoint = meta.endpoint_url
        region = meta.region_name
    except AttributeError:
        return None
    if style != "path" or creds is None or not endpoint or not region:
        return None
    import urllib.request  # here: 13 ms of imports (http.client, email) a copy rarely needs

    url = urlsplit(endpoint)
    proxies = dict(getattr(meta.config, "proxies", None) or {}) or urllib.request.getproxies()
    if url.scheme in proxies and not urllib.request.proxy_bypass(url.hostname or ""):
        return None  # botocore goes through a proxy; this path would not

    # TLS as botocore verifies it: its CA bundle (from its own config chain), never
    # unverified; a client built with verification off is not imitated.
    verify = getattr(
        getattr(getattr(client, "_endpoint", None), "http_session", None), "_verify", True
    )
    if verify is False:
        return None
    ca_bundle = verify if isinstance(verify, str) else None

    try:
        return FastClient(
            endpoint, bucket, region, from_botocore(creds), ca_bundle=ca_bundle, **timeouts
        )
    except ValueError as exc:
        log.info("fast HEAD path not used: %s", exc)
        return None
