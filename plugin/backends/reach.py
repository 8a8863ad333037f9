"""Create-time check that a bucket answers, with the S3 layer's client and short timeouts.

Why at Create: a typo in a bucket, endpoint or profile would otherwise surface only at the
first Mount (stage-in) or, worse, after the last Unmount (stage-out), when the container's
output has nowhere to go. Timeouts are short: Docker waits for Create. Written against the
S3 layer only, so both the S3 backend and staged volumes ask it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plugin.backends.credentials import CredentialsFile
from plugin.errors import InvalidOptionError
from plugin.s3.errors import error_code

#: Seconds to connect and to wait for the answer: a reachable endpoint answers in far less.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0

_NO_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
_DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def check_bucket_reachable(
    bucket: str, options: Mapping[str, str], credentials: CredentialsFile
) -> None:
    """InvalidOptionError saying what to fix unless *bucket* answers HeadBucket with the
    `endpoint`, `region` and `profile` of *options* and the daemon's *credentials*."""
    from plugin.s3.client import S3Settings, make_s3_client  # boto3: ~0.2 s, only when asked

    settings = S3Settings(
        endpoint_url=options.get("endpoint"),
        region=options.get("region"),
        profile=options.get("profile"),
        credentials_file=credentials.usable(),
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_attempts=1,
    )
    try:
        make_s3_client(settings).head_bucket(Bucket=bucket)
    except Exception as exc:
        problem = _problem(exc, bucket, options, credentials)
        if problem is None:
            raise
        raise InvalidOptionError(problem) from None


def _problem(
    exc: BaseException, bucket: str, options: Mapping[str, str], credentials: CredentialsFile
) -> str | None:
    """What the user can act on, for the exceptions a HeadBucket raises; None for others."""
    import botocore.exceptions as bce

    endpoint = options.get("endpoint") or "the default AWS endpoint"
    where = f"bucket {bucket!r} at {endpoint}"
    unreachable: tuple[type[Any], ...] = (
        bce.EndpointConnectionError,
        bce.ConnectTimeoutError,
        bce.ReadTimeoutError,
        bce.ConnectionClosedError,
    )
    if isinstance(exc, bce.ProfileNotFound):
        return (
            f"profile {options.get('profile')!r} not found in the daemon's AWS config or in "
            f"{credentials}"
        )
    if isinstance(exc, bce.NoCredentialsError):
        return (
            f"no S3 credentials for {where}: give the daemon AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY, or a profile in {credentials} and -o profile=NAME"
        )
    if isinstance(exc, unreachable):
        return f"cannot reach S3 endpoint {endpoint} ({exc})"
    if isinstance(exc, bce.ClientError):
        code = error_code(exc)
        if code in _NO_BUCKET:
            return f"{where} does not exist"
        if code in _DENIED:
            return (
                f"access to {where} denied ({code}); check the daemon's credentials or -o profile="
            )
        return f"checking {where} failed: {exc}"
    if isinstance(exc, ValueError):  # e.g. an endpoint URL botocore cannot parse
        return f"invalid S3 settings for {where}: {exc}"
    return None
