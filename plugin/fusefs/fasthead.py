"""SigV4-signed HEAD requests over kept-alive sockets, without botocore.

Why: listing a directory HEADs every entry for its s3fs metadata (mode/owner/mtime), and
botocore spends over a millisecond of CPU per request (endpoint rules, event hooks, response
parsing) where the server answers in tens of microseconds: 10,000 entries took seconds of
pure client CPU. A hand-signed HEAD costs a fraction of that. This path is an optimisation
only: path-style endpoints, credentials taken from the boto3 client, and anything unexpected
raises `FastHeadError` so the caller asks boto3 instead.
"""

from __future__ import annotations

import calendar
import email.utils
import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

log = logging.getLogger(__name__)

#: SHA-256 of an empty body: what a HEAD carries.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: Give up on the fast path after this many transport failures in a row.
MAX_FAILURES = 3


class FastHeadError(Exception):
    """This request could not be answered on the fast path; use boto3."""


Credentials = Callable[[], tuple[str, str, str | None]]


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.reusable = True

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class HeadClient:
    """HEAD object requests for one bucket; thread-safe (one connection per thread)."""

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
        #: False once the server closes connections after each answer.
        self.keepalive = True
        #: False once a pipelined batch broke (some servers drop what follows a request).
        self.pipelining = True
        self._failures = 0
        self._local = threading.local()
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

    def request_bytes(self, key: str, now: float | None = None) -> bytes:
        """The signed request for *key* (public for tests)."""
        access, secret, token = self.credentials()
        path = f"/{quote(self.bucket, safe='')}/{quote(key, safe='/')}"
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = amz_date[:8]
        headers = [
            ("host", self.netloc),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", amz_date),
        ]
        if token:
            headers.append(("x-amz-security-token", token))
        signed = ";".join(name for name, _ in headers)
        canonical = "\n".join(
            [
                "HEAD",
                path,
                "",
                "".join(f"{name}:{value}\n" for name, value in headers),
                signed,
                EMPTY_SHA256,
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
        lines = [f"HEAD {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(
            f"authorization: AWS4-HMAC-SHA256 Credential={access}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    # -- transport --------------------------------------------------------------------------

    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self.read_timeout)
        return _Conn(sock)

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _exchange(self, request: bytes) -> tuple[int, dict[str, str]]:
        conn: _Conn | None = getattr(self._local, "conn", None)
        reused = conn is not None
        for attempt in range(2):
            if conn is None:
                conn = self._local.conn = self._connect()
            try:
                conn.sock.sendall(request)
                status, headers = self._read_response(conn)
                if not conn.reusable:
                    self._drop()
                return status, headers
            except (OSError, ValueError) as exc:
                self._drop()
                conn = None
                # A kept-alive connection the server closed meanwhile: one fresh try.
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                raise FastHeadError(f"HEAD transport: {exc}") from exc
            except FastHeadError:
                self._drop()
                raise
        raise FastHeadError("unreachable")

    def _read_response(self, conn: _Conn) -> tuple[int, dict[str, str]]:
        status_line = conn.rfile.readline(8192)
        if not status_line:
            raise ConnectionResetError("connection closed by the server")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise FastHeadError(f"bad status line {status_line[:80]!r}")
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
                raise FastHeadError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()

    def head_many(
        self, keys: list[str], window: int = 16
    ) -> list[tuple[int, dict[str, str]] | FastHeadError]:
        """HEAD several keys over this thread's connection, pipelined *window* at a time
        (no round trip per request). Each result is what `head` returns or raises; keys
        after a broken connection fail with FastHeadError, for the caller's fallback."""
        out: list[tuple[int, dict[str, str]] | FastHeadError] = []
        i = 0
        while i < len(keys):
            if not self.enabled:
                out += [FastHeadError("disabled")] * (len(keys) - i)
                break
            batch = keys[i : i + (window if self.keepalive and self.pipelining else 1)]
            conn: _Conn | None = getattr(self._local, "conn", None)
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                conn.sock.sendall(b"".join(self.request_bytes(k) for k in batch))
                answers = [self._read_response(conn) for _ in batch]
                if not conn.reusable:
                    self._drop()
            except (OSError, ValueError, FastHeadError) as exc:
                self._drop()
                if len(batch) > 1:
                    self.pipelining = False
                # Once more, one by one on a fresh connection (a kept-alive one may have
                # been closed by the server meanwhile).
                for k in batch:
                    try:
                        out.append(self.head(k))
                    except FastHeadError as err:
                        out.append(err)
                log.debug("pipelined HEADs fell back to single requests: %s", exc)
                i += len(batch)
                continue
            for status, headers in answers:
                if status in (400, 403):
                    self.enabled = False
                    log.info("fast HEAD path refused by the server (HTTP %d)", status)
                if status not in (200, 404):
                    out.append(FastHeadError(f"HTTP {status}"))
                else:
                    out.append((status, headers))
            self._failures = 0
            i += len(batch)
        return out

    def head(self, key: str) -> tuple[int, dict[str, str]]:
        """(status, lower-cased headers) of HEAD *key*. Blocking: call from a worker thread.

        Only 200 and 404 come back; other answers raise `FastHeadError`, and 400/403 (the
        server does not like our signing) or repeated transport errors switch it off."""
        if not self.enabled:
            raise FastHeadError("disabled")
        try:
            status, headers = self._exchange(self.request_bytes(key))
        except FastHeadError:
            self._failures += 1
            if self._failures >= MAX_FAILURES and self.enabled:
                self.enabled = False
                log.info("fast HEAD path off after %d failures; using boto3", self._failures)
            raise
        self._failures = 0
        if status in (400, 403):
            self.enabled = False
            log.info("fast HEAD path refused by the server (HTTP %d); using boto3", status)
            raise FastHeadError(f"HTTP {status}")
        if status not in (200, 404):
            raise FastHeadError(f"HTTP {status}")
        return status, headers


def parse_http_date(value: str | None) -> int:
    """Last-Modified in nanoseconds since the epoch (0 if missing or garbled)."""
    if not value:
        return 0
    parsed = email.utils.parsedate(value)
    if parsed is None:
        return 0
    return calendar.timegm(parsed) * 1_000_000_000


def from_boto3_client(client: Any, bucket: str, **timeouts: float) -> HeadClient | None:
    """A HeadClient with the boto3 client's endpoint, region and credentials, or None if
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

    def _credentials() -> tuple[str, str, str | None]:
        frozen = creds.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    try:
        return HeadClient(endpoint, bucket, region, _credentials, **timeouts)
    except ValueError as exc:
        log.info("fast HEAD path not used: %s", exc)
        return None
