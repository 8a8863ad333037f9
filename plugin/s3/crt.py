"""Requests through the AWS CRT S3 client (`awscrt`), optional: imported only when the
package is installed (see `plugin.s3.crtstore` for which requests it serves and why).

Why: botocore spends milliseconds of Python CPU per request and moves bodies through Python
in small reads; the CRT client does HTTP, signing and body buffering in C on its own
event-loop threads and hands us whole parts (one callback per 8 MiB chunk).

Notes:
- boto3's own CRT integration ignores `endpoint_url` (perf-anchors §1.2), so requests are
  built here by hand: path-style `/bucket/key`, explicit Host header, TLS only for https.
- Credentials come from the environment or the shared files (`--profile`) through CRT's own
  providers; if those find none, from botocore's full chain (web identity, SSO, container
  credentials on ECS/EKS, the instance metadata service on EC2, ...) through a delegate that
  asks botocore at every signing, so role credentials are refreshed before they expire.
- CRT retries a failed part at most once (it delivers a part only when complete, so the
  engine's byte accounting stays exact); the engine's own retries and resume do the rest.
"""

from __future__ import annotations

import contextlib
import io as pyio
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

from awscrt import auth, http, io, s3  # type: ignore[import-untyped,unused-ignore]
from awscrt.exceptions import AwsCrtError  # type: ignore[import-untyped,unused-ignore]

from plugin.s3 import xmldoc
from plugin.s3.errors import S3Error
from plugin.s3.observe import observed
from plugin.s3.store import Sink

log = logging.getLogger(__name__)

#: CRT error names meaning the endpoint cannot be reached at all.
UNREACHABLE = (
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

DEFAULT = s3.S3RequestType.DEFAULT
GET_OBJECT = s3.S3RequestType.GET_OBJECT
PUT_OBJECT = s3.S3RequestType.PUT_OBJECT


class CrtRequestError(S3Error):
    """A CRT request failed: the CRT error *name* besides status, S3 code and message (the
    error body read by the one XML parser)."""

    def __init__(self, what: str, name: str, status: int, body: bytes | None) -> None:
        code, message = xmldoc.error_of(xmldoc.xml_root(body or b""))
        detail = f" {code}" if code else ""
        super().__init__(
            f"{what}: {name} (HTTP {status}){detail}",
            status=status,
            code=code,
            s3_message=message,
        )
        self.name = name

    def is_transient(self) -> bool:
        if self.status >= 500 or self.status in (408, 429):
            return True
        return self.name in _TRANSIENT_NAMES or self.name.startswith(_TRANSIENT_PREFIXES)


class _Delegate:
    """Hands botocore's current credentials (standard chain, refreshed as needed) to CRT."""

    def __init__(self, credentials: Any) -> None:
        self._creds = credentials

    def __call__(self) -> Any:
        frozen = self._creds.get_frozen_credentials()
        return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)


class CrtClient:
    """Signed requests through one CRT S3 client, for one endpoint."""

    def __init__(
        self,
        endpoint_url: str | None,
        region: str,
        profile: str | None,
        botocore_credentials: Callable[[], Any],
        *,
        max_connections: int,
        part_size: int,
    ) -> None:
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
        self.provider = self._credentials(bootstrap, profile, botocore_credentials)
        self._crt = s3.S3Client(
            bootstrap=bootstrap,
            region=region,
            tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
            signing_config=s3.create_default_s3_signing_config(
                region=region, credential_provider=self.provider
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

    @staticmethod
    def _credentials(
        bootstrap: Any, profile: str | None, botocore_credentials: Callable[[], Any]
    ) -> Any:
        """Environment, then the shared files; else botocore's whole chain (imports boto3):
        container credentials, the instance metadata service and the rest. Raises
        NoCredentialsError (plugin.s3.store) when none of them has any."""
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
        return auth.AwsCredentialsProvider.new_delegate(_Delegate(botocore_credentials()))

    def keys(self) -> tuple[str, str, str | None]:
        """The provider's current keys (for the hand-signed path)."""
        c = self.provider.get_credentials().result(timeout=10)
        return c.access_key_id, c.secret_access_key, c.session_token

    def path(self, bucket: str, key: str, query: str = "") -> str:
        path = f"{self._base}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        return f"{path}?{query}" if query else path

    def bucket_path(self, bucket: str, query: dict[str, str]) -> str:
        return f"{self._base}/{bucket}?{urllib.parse.urlencode(query, quote_via=_quote)}"

    def run(
        self,
        what: str,
        rtype: Any,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None = None,
        sink: Sink | None = None,
        operation: str | None = None,
        observe_as: str = "S3",
    ) -> tuple[int, dict[str, str]]:
        """One request; (status, lower-cased headers). Observed as *operation*, else as
        *observe_as* (the CRT needs no name for the split GET and PUT types)."""
        with observed(operation or observe_as):
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


def _quote(text: str | bytes, safe: str | bytes = "", *args: Any) -> str:
    """Query values for SigV4: everything but unreserved characters percent-encoded."""
    return urllib.parse.quote(text, safe="-_.~")
