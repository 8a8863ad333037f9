"""SigV4-signed S3 requests over kept-alive sockets, without botocore or the CRT.

Why: per-object requests dominate two workloads. Listing a directory in the S3 filesystem
HEADs every entry for its s3fs metadata, and botocore spends over a millisecond of CPU per
request (endpoint rules, event hooks, response parsing) where the server answers in tens of
microseconds. The copy core moves 10,000 small objects, where the CRT client's per-request
machinery (buffer pool, callbacks into Python from its threads) cost more than the transfer.
A hand-signed HEAD, LIST, GET or PUT (multipart parts and their control calls included) costs
a fraction of either. This path is an optimisation only: path-style endpoints, bodies held in
memory, and anything unexpected raises `FastPathError` so the caller uses its general client
instead.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import email.utils
import hashlib
import hmac
import io
import logging
import os
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

#: SHA-256 of an empty body: what a HEAD carries.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: Give up on the fast path after this many transport failures in a row.
MAX_FAILURES = 3


def read_exact(fp: io.BufferedReader, sock: socket.socket, view: memoryview) -> int:
    """Fill *view* with the next bytes of a response body: those already in *fp*'s buffer,
    then straight from *sock* with MSG_WAITALL, one syscall (and one release of the GIL) for
    the lot instead of one per arriving segment. TLS sockets take no recv flags and are read
    through *fp*. Returns the count: short only at end of stream. A read timeout set on the
    socket still applies (as SO_RCVTIMEO) and raises TimeoutError."""
    done = 0
    if fp.peek(1):  # bytes buffered (or, buffer empty, the first ones to arrive)
        done = fp.readinto1(view)
    if type(sock) is not socket.socket:
        while done < len(view):
            n = fp.readinto(view[done:])
            if not n:
                break
            done += n
        return done
    timeout = sock.gettimeout()
    try:
        sock.settimeout(None)  # MSG_WAITALL needs a blocking socket...
        seconds = timeout or 0.0
        # ...and SO_RCVTIMEO keeps the read timeout: a stalled server ends the recv.
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        while done < len(view):
            n = sock.recv_into(view[done:], len(view) - done, socket.MSG_WAITALL)
            if not n:
                break
            done += n
    except BlockingIOError as exc:
        raise TimeoutError(f"no data from the server for {timeout} s") from exc
    finally:
        sock.settimeout(timeout)
    return done


class FastPathError(Exception):
    """This request could not be answered on the fast path; use boto3."""


Credentials = Callable[[], tuple[str, str, str | None]]


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.reusable = True
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self.rfile.close()
        finally:
            self.sock.close()


#: Least seconds the answers after the first of an unproven pipelined batch may take.
PIPELINE_TRIAL_TIMEOUT = 1.0


class FastClient:
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
    ) -> None:
        url = urlsplit(endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"unsupported endpoint {endpoint_url!r}")
        if url.path not in ("", "/") or url.query:
            raise ValueError(f"endpoint with a path {endpoint_url!r}")
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.netloc = url.netloc
        self.bucket = bucket
        self.region = region
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.enabled = True
        #: Extra headers (lower-case names) of whole-object GETs (`get_object`, `get_many`),
        #: e.g. [("x-amz-checksum-mode", "ENABLED")] for the stored CRC in the answer.
        self.whole_get_headers: list[tuple[str, str]] = []
        #: False once the server closes connections after each answer.
        self.keepalive = True
        #: False once a pipelined batch broke (some servers drop what follows a request).
        self.pipelining = True
        #: True once a pipelined batch was answered whole. Until then the answers after a
        #: batch's first get `_trial_timeout`: moto's server answers only the first request
        #: of a batch and then waits, and 30 tiny GETs took the whole read timeout (60 s).
        self.pipelining_proven = False
        self._failures = 0
        self._local = threading.local()
        #: Every open connection, whichever thread it belongs to, for `close`.
        self._conns: set[_Conn] = set()
        self._conns_lock = threading.Lock()
        self._keys: dict[tuple[str, str], bytes] = {}
        self._ssl: ssl.SSLContext | None = None
        if self.https:
            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))

    # -- signing ----------------------------------------------------------------------------

    def _signing_key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): key}
        return key

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
        access, secret, token = self.credentials()
        path = (
            f"/{quote(self.bucket, safe='')}/{quote(key, safe='/')}"
            if key
            else (f"/{quote(self.bucket, safe='')}")
        )
        # SigV4 canonical query: names sorted, everything but unreserved characters encoded.
        qs = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, v in sorted((query or {}).items())
        )
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = amz_date[:8]
        headers = [
            *(headers or []),
            ("host", self.netloc),
            ("x-amz-content-sha256", payload_hash),
            ("x-amz-date", amz_date),
        ]
        if token:
            headers.append(("x-amz-security-token", token))
        headers.sort()
        signed = ";".join(name for name, _ in headers)
        canonical = "\n".join(
            [
                method,
                path,
                qs,
                "".join(f"{name}:{' '.join(value.split())}\n" for name, value in headers),
                signed,
                payload_hash,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        signature = hmac.new(
            self._signing_key(secret, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        lines = [f"{method} {path}{'?' + qs if qs else ''} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(
            f"authorization: AWS4-HMAC-SHA256 Credential={access}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def list_v2(
        self, prefix: str, token: str | None, delimiter: str | None, max_keys: int
    ) -> dict[str, Any]:
        """ListObjectsV2, parsed like botocore does (the keys this module's caller uses):
        Contents [Key, Size, ETag, LastModified ns], CommonPrefixes [Prefix], IsTruncated,
        NextContinuationToken. Blocking; FastPathError for anything unexpected."""
        if not self.enabled:
            raise FastPathError("disabled")
        query = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys)}
        query["prefix"] = prefix
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        request = self.request_bytes("", method="GET", query=query)
        status, _headers, body = self._call("LIST", request)
        if status != 200:
            self._refused(status)
            raise FastPathError(f"LIST HTTP {status}")
        return _parse_list(body)

    def get_object(self, key: str, max_size: int) -> tuple[int, dict[str, str], bytes]:
        """GET a whole (small) object: (status, lower-cased headers, body). 200 and 404 come
        back; anything else, or a body over *max_size*, raises FastPathError."""
        if not self.enabled:
            raise FastPathError("disabled")
        request = self.request_bytes(key, method="GET", headers=self.whole_get_headers)
        status, answer, body = self._call("GET", request, max_body=max_size)
        if status not in (200, 404):
            self._refused(status)
            raise FastPathError(f"GET HTTP {status}")
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
                if status not in (200, 404):
                    self._refused(status)
                    out.append(FastPathError(f"GET HTTP {status}"))
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
        end = start + len(view) - 1
        extra = [("range", f"bytes={start}-{end}")]
        if etag:
            extra.append(("if-match", f'"{etag}"'))
        request = self.request_bytes(key, method="GET", headers=extra)
        conn, status, headers = self._send("GET", request)
        answered = headers.get("content-range", "")
        if (
            status not in (200, 206)  # rclone answers 200 with the Content-Range asked for
            or not answered.startswith(f"bytes {start}-{end}/")
            or headers.get("content-length") != str(len(view))
        ):
            self._drop()  # the body (if any) stays unread
            self._refused(status)
            raise FastPathError(f"GET {key} [{start}, {end}]: HTTP {status} {answered!r}")
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
        """The server checks Content-MD5; the payload itself is not signed (UNSIGNED-PAYLOAD),
        so it is hashed once, not twice (botocore signs a plain-HTTP payload with SHA-256)."""
        if not self.enabled:
            raise FastPathError("disabled")
        headers = [*headers, ("content-length", str(len(body)))]
        if md5 is not None:
            headers.append(("content-md5", base64.b64encode(md5).decode()))
        head = self.request_bytes(
            key, method="PUT", query=query, headers=headers, payload_hash="UNSIGNED-PAYLOAD"
        )
        status, answer, reply = self._call(what, head, payload=body)
        if status != 200:
            code = _error_code(_xml_root(reply))
            self._refused(status, code)
            raise FastPathError(f"{what}: HTTP {status} {code}")
        return status, answer

    # -- multipart control plane -------------------------------------------------------------

    def create_multipart(self, key: str, headers: list[tuple[str, str]]) -> str:
        """CreateMultipartUpload; its UploadId."""
        root = self._xml_call("CREATE UPLOAD", key, "POST", {"uploads": ""}, headers=headers)
        upload_id = root.findtext(f"{_ns(root)}UploadId")  # rclone names the root differently
        if not upload_id:
            raise FastPathError(f"CREATE UPLOAD: no UploadId in {root.tag}")
        return upload_id

    def list_uploads(self, prefix: str) -> list[tuple[str, str, str]]:
        """(key, upload id, initiated) of the first 1,000 uploads in progress under *prefix*."""
        root = self._xml_call(
            "LIST UPLOADS", "", "GET", {"uploads": "", "prefix": prefix}, none_if="NoSuchUpload"
        )
        if root.tag == "none":  # rclone's answer when there are none
            return []
        ns = _ns(root)
        return [
            (
                u.findtext(f"{ns}Key") or "",
                u.findtext(f"{ns}UploadId") or "",
                u.findtext(f"{ns}Initiated") or "",
            )
            for u in root.iterfind(f"{ns}Upload")
        ]

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        """CompleteMultipartUpload; the object's ETag. An error in a 200 answer raises."""
        body = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
            for n, etag in parts
        )
        xml = f'<CompleteMultipartUpload xmlns="{_NS[1:-1]}">{body}</CompleteMultipartUpload>'
        root = self._xml_call(
            "COMPLETE UPLOAD", key, "POST", {"uploadId": upload_id}, payload=xml.encode()
        )
        return root.findtext(f"{_ns(root)}ETag") or ""

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
        root = _xml_root(body)
        code = _error_code(root)
        if code and code == none_if:
            return ElementTree.Element("none")
        if code or status != 200 or root is None:
            self._refused(status, code)
            raise FastPathError(f"{what}: HTTP {status} {code}")
        return root

    def _refused(self, status: int, code: str = "") -> None:
        if status in (400, 403) and code not in _REQUEST_ERRORS:
            # The server does not like our signing (or this path): stop trying it.
            self.enabled = False
            log.info("fast S3 path refused by the server (HTTP %d); using the full client", status)

    def _call(
        self,
        what: str,
        request: bytes,
        *,
        payload: bytes = b"",
        body: bool = True,
        max_body: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send *request* (then *payload*) on this thread's connection and read the whole
        answer (a HEAD's has no body, whatever its Content-Length says)."""
        conn, status, headers = self._send(what, request, payload)
        try:
            data = self._read_body(conn, headers, max_body) if body else b""
        except (OSError, ValueError) as exc:
            self._drop()
            raise FastPathError(f"{what} transport: {exc}") from exc
        except FastPathError:
            self._drop()
            raise
        if not conn.reusable:
            self._drop()
        return status, headers, data

    def _send(
        self, what: str, request: bytes, payload: bytes = b""
    ) -> tuple[_Conn, int, dict[str, str]]:
        """Send *request* and *payload* on this thread's connection; (connection, status,
        headers) with the body still to read. A kept-alive connection the server closed
        meanwhile gets one fresh try."""
        conn = self._live_conn()
        for attempt in range(2):
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                conn.sock.sendall(request)
                if payload:
                    conn.sock.sendall(payload)
                status, headers = self._read_response(conn)
                return conn, status, headers
            except (OSError, ValueError) as exc:
                self._drop()
                conn = None
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                raise FastPathError(f"{what} transport: {exc}") from exc
            except FastPathError:
                self._drop()
                raise
        raise FastPathError("unreachable")

    def _read_body(
        self, conn: _Conn, headers: dict[str, str], max_body: int | None = None
    ) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = conn.rfile.readline(1024)
                if not size_line:
                    raise ConnectionResetError("connection closed in a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while conn.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                data = conn.rfile.read(size)
                if len(data) != size:
                    raise ConnectionResetError("short chunk")
                parts.append(data)
                conn.rfile.readline(8)
        length = headers.get("content-length")
        if length is None:
            raise FastPathError("body without a length")
        if max_body is not None and int(length) > max_body:
            raise FastPathError(f"body of {length} bytes is over {max_body}")
        data = conn.rfile.read(int(length))
        if len(data) != int(length):
            raise ConnectionResetError("short body")
        return data

    # -- transport --------------------------------------------------------------------------

    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self.read_timeout)
        conn = _Conn(sock)
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _live_conn(self) -> _Conn | None:
        """This thread's connection, unless `close` closed it meanwhile."""
        conn: _Conn | None = getattr(self._local, "conn", None)
        return conn if conn is not None and not conn.closed else None

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (a thread's next request opens a new one)."""
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()

    def _exchange(self, request: bytes) -> tuple[int, dict[str, str]]:
        status, headers, _ = self._call("HEAD", request, body=False)
        return status, headers

    def _read_response(self, conn: _Conn) -> tuple[int, dict[str, str]]:
        status_line = conn.rfile.readline(8192)
        if not status_line:
            raise ConnectionResetError("connection closed by the server")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise FastPathError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = conn.rfile.readline(65536)
            if line in (b"\r\n", b"\n"):
                connection = headers.get("connection", "").lower()
                if connection == "close" or (
                    parts[0] == b"HTTP/1.0" and connection != "keep-alive"
                ):
                    # One request per connection (e.g. an HTTP/1.0 server): no pipelining.
                    conn.reusable = False
                    self.keepalive = False
                return status, headers
            if not line:
                raise ConnectionResetError("connection closed in the headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise FastPathError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()

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
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                sent = time.monotonic()
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
            for status, headers in answers:
                if status in (400, 403):
                    self.enabled = False
                    log.info("fast HEAD path refused by the server (HTTP %d)", status)
                if status not in (200, 404):
                    out.append(FastPathError(f"HTTP {status}"))
                else:
                    out.append((status, headers))
            self._failures = 0
            i += len(batch)
        return out

    def _trial_timeout(self, conn: _Conn, sent: float) -> None:
        """The first answer of a pipelined batch is in: while pipelining is unproven, the
        rest must follow within 1 s or four times that answer's wait, whichever is longer."""
        if not self.pipelining_proven:
            wait = max(PIPELINE_TRIAL_TIMEOUT, 4 * (time.monotonic() - sent))
            conn.sock.settimeout(min(wait, self.read_timeout))

    def _trial_passed(self, conn: _Conn, answered: int) -> None:
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
        if status in (400, 403):
            self.enabled = False
            log.info("fast HEAD path refused by the server (HTTP %d); using boto3", status)
            raise FastPathError(f"HTTP {status}")
        if status not in (200, 404):
            raise FastPathError(f"HTTP {status}")
        return status, headers


_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


#: S3 error codes about one request's content, not about how we sign: they do not switch
#: the fast path off (the caller falls back once, and the full client reports the error).
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


def _ns(root: ElementTree.Element) -> str:
    """The S3 namespace prefix if the document uses it (some servers leave it out)."""
    return _NS if root.tag.startswith(_NS) else ""


def _xml_root(body: bytes) -> ElementTree.Element | None:
    try:
        return ElementTree.fromstring(body) if body.strip() else None
    except ElementTree.ParseError:
        return None


def _error_code(root: ElementTree.Element | None) -> str:
    """The Code of an S3 <Error> document ("" if *root* is not one)."""
    if root is None or root.tag.rpartition("}")[2] != "Error":
        return ""
    return root.findtext(f"{_ns(root)}Code") or "Error"


def _parse_list(body: bytes) -> dict[str, Any]:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise FastPathError(f"LIST: bad XML: {exc}") from exc
    ns = _ns(root)
    if root.tag != f"{ns}ListBucketResult":
        raise FastPathError(f"LIST: unexpected answer {root.tag}")
    url = root.findtext(f"{ns}EncodingType") == "url"

    def _name(value: str | None) -> str:
        if value is None:
            raise FastPathError("LIST: entry without a name")
        return unquote_plus(value) if url else value  # as botocore decodes it

    contents = []
    for c in root.iterfind(f"{ns}Contents"):
        modified = c.findtext(f"{ns}LastModified")
        contents.append(
            {
                "Key": _name(c.findtext(f"{ns}Key")),
                "Size": int(c.findtext(f"{ns}Size") or 0),
                "ETag": c.findtext(f"{ns}ETag"),
                "LastModifiedNs": parse_iso_date(modified),
            }
        )
    prefixes = [
        {"Prefix": _name(p.findtext(f"{ns}Prefix"))} for p in root.iterfind(f"{ns}CommonPrefixes")
    ]
    return {
        "Contents": contents,
        "CommonPrefixes": prefixes,
        "IsTruncated": (root.findtext(f"{ns}IsTruncated") or "").lower() == "true",
        "NextContinuationToken": root.findtext(f"{ns}NextContinuationToken"),
    }


def parse_iso_date(value: str | None) -> int:
    """S3's ISO 8601 LastModified in nanoseconds (0 if missing or garbled)."""
    if not value:
        return 0
    try:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp() * 1_000_000_000)


def parse_http_date(value: str | None) -> int:
    """Last-Modified in nanoseconds since the epoch (0 if missing or garbled)."""
    if not value:
        return 0
    parsed = email.utils.parsedate(value)
    if parsed is None:
        return 0
    return calendar.timegm(parsed) * 1_000_000_000


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
    url = urlsplit(endpoint)
    proxies = dict(getattr(meta.config, "proxies", None) or {}) or urllib.request.getproxies()
    if url.scheme in proxies and not urllib.request.proxy_bypass(url.hostname or ""):
        return None  # botocore goes through a proxy; this path would not

    def _credentials() -> tuple[str, str, str | None]:
        frozen = creds.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    try:
        return FastClient(endpoint, bucket, region, _credentials, **timeouts)
    except ValueError as exc:
        log.info("fast HEAD path not used: %s", exc)
        return None
