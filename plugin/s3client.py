"""boto3 client factory and error classification shared by everything that talks to S3.

Endpoints are always explicit (S3-compatible servers, loopback in tests) and timeouts are short:
a FUSE request blocked on a dead endpoint for minutes looks like a hung mount to the user.
Credentials come only from the standard AWS chain (env, shared files, a named profile), never
from command-line arguments, which other users can read in /proc.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session

log = logging.getLogger(__name__)

#: Error codes that mean "no such key" across AWS, moto and rclone (HEAD has no body: "404").
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchObject"})

#: Codes worth retrying later: throttling and server-side trouble.
TEMP_FAILURE_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
    }
)


@dataclass(frozen=True)
class S3Settings:
    """Where and how to connect. Secrets are deliberately not part of this."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: str | None = None
    #: Seconds to wait for a TCP connection; loopback and LAN endpoints answer in milliseconds.
    connect_timeout: float = 5.0
    #: Seconds without a byte on an open connection before botocore gives up on it.
    read_timeout: float = 60.0
    #: Total attempts per request (botocore "standard" mode, with backoff and jitter).
    max_attempts: int = 3
    #: Must cover FUSE worker concurrency plus parallel multipart parts, or requests queue.
    max_pool_connections: int = 32
    #: Path-style URLs work with every S3-compatible server; virtual-host needs DNS.
    path_style: bool = True


def make_s3_client(settings: S3Settings) -> Any:
    """Build a thread-safe boto3 S3 client for *settings*.

    Returns ``Any`` because boto3's client classes are generated at runtime.
    """
    bc_session = botocore.session.Session(profile=settings.profile)
    if settings.credentials_file:
        bc_session.set_config_variable("credentials_file", settings.credentials_file)
    session = boto3.session.Session(botocore_session=bc_session)
    config = botocore.config.Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        max_pool_connections=settings.max_pool_connections,
        s3={"addressing_style": "path" if settings.path_style else "auto"},
        # Some S3-compatible servers reject the newer default integrity headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region or "us-east-1",
        config=config,
    )


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of *exc*, or None if it is not a service error."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code")
        if code is None:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(status) if status is not None else None
        return str(code)
    return None


def is_not_found(exc: BaseException) -> bool:
    """True if *exc* says the object (not the bucket) does not exist."""
    return error_code(exc) in NOT_FOUND_CODES


def is_temp_failure(exc: BaseException) -> bool:
    """True if retrying the same request later may succeed (network, throttling, 5xx)."""
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ResponseStreamingError,
    ):
        return True
    code = error_code(exc)
    return code is not None and code in TEMP_FAILURE_CODES


#: Name of the probe object `dir_markers_supported` writes (and deletes) below a prefix.
PROBE_NAME = ".stowage-probe-"
#: Codes that say the probe was not allowed to write: the answer stays unknown.
DENIED_CODES = frozenset({"403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId"})


def parse_dir_markers(value: str) -> bool | None:
    """The `dir_markers` option: `auto` (None: ask the server), or true/false."""
    if value.strip().lower() == "auto":
        return None
    from plugin.options import parse_bool

    return parse_bool(value)


def check_dir_markers(value: str) -> str:
    """Option validator: auto, true or false."""
    parse_dir_markers(value)
    return value


class ProbeError(Exception):
    """The probe could not tell (server unreachable, writes denied): ask again later."""


def dir_markers_supported(client: Any, bucket: str, prefix: str = "") -> bool:
    """Whether the server keeps an empty `x/` object as a directory marker.

    S3, MinIO, Ceph and moto do; `rclone serve s3` on a directory stores the PUT of `x/` as a
    0-byte *file* `x`, after which nothing can be written below `x/`. The probe PUTs a
    uniquely named `<prefix>/.stowage-probe-<random>/`, LISTs that name without the slash,
    and deletes what it made: True if the listing holds the key with its slash, False if the
    server refused such a key or turned it into something else. Costs three or four requests.
    Raises ProbeError when it cannot tell (transient failure, writes denied).
    """
    base = prefix.strip("/")
    name = f"{base}/" if base else ""
    name += PROBE_NAME + secrets.token_hex(8)
    marker = name + "/"
    try:
        client.put_object(
            Bucket=bucket, Key=marker, Body=b"", ContentType="application/x-directory"
        )
    except botocore.exceptions.ClientError as exc:
        code = error_code(exc)
        if is_temp_failure(exc) or code in DENIED_CODES or code in ("404", "NoSuchBucket"):
            raise ProbeError(f"PUT {marker}: {exc}") from exc
        log.info("s3://%s refuses 'dir/' marker keys (%s): no directory markers", bucket, code)
        return False
    except botocore.exceptions.BotoCoreError as exc:
        raise ProbeError(f"PUT {marker}: {exc}") from exc
    keys: set[str] = set()
    try:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=name, MaxKeys=10)
        keys = {str(o["Key"]) for o in listing.get("Contents", [])}
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise ProbeError(f"LIST {name}: {exc}") from exc
    finally:
        for key in sorted(keys | {marker}, reverse=True):
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=key)
    supported = marker in keys
    log.info(
        "s3://%s %s 'dir/' markers (probe kept %s)",
        bucket,
        "keeps" if supported else "cannot keep",
        sorted(keys) or "nothing",
    )
    return supported


def resolve_dir_markers(value: bool | None, settings: S3Settings, bucket: str, prefix: str) -> bool:
    """`dir_markers` for a copy to `s3://bucket/prefix`: an explicit value as it is; `auto`
    (None) asked of the server, or True (what S3 does) when the probe cannot tell. Blocking."""
    if value is not None:
        return value
    try:
        return dir_markers_supported(make_s3_client(settings), bucket, prefix)
    except ProbeError as exc:
        log.warning(
            "cannot tell whether s3://%s keeps 'dir/' markers (%s); using them", bucket, exc
        )
        return True
