"""One error scheme for every S3 client: `S3Error` (HTTP status, S3 code, S3's message),
raised by the CRT client (`CrtRequestError`) and, as `FastPathError`, by the fast path when
it cannot answer (the caller falls back, see `fallback.py`); and the classification helpers,
which understand botocore's ClientError (the same three facts) too. botocore is never
imported here: an exception can only be one of its classes if the caller loaded it."""

from __future__ import annotations

import sys
from typing import Any


class S3Error(Exception):
    """A request failed. *status* is the HTTP status of the answer (0: no answer, e.g. a
    broken connection), *code* the S3 error code (the status as text when the error answer
    had no body, as for HEAD; "" without an answer), *s3_message* S3's own <Message>."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", s3_message: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code or (str(status) if status >= 300 else "")
        self.s3_message = s3_message


class FastPathError(S3Error):
    """This request could not be answered on the fast path (the path is off, the server
    answered something unexpected, the connection broke): the caller uses its general client
    (`plugin.s3.fallback`)."""

    def __init__(self, message: str, code: str = "", *, status: int = 0) -> None:
        super().__init__(message, status=status, code=code)


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

#: Codes of an object that changed under a conditional request.
PRECONDITION_CODES = frozenset({"412", "PreconditionFailed"})


def _botocore() -> Any:
    return sys.modules.get("botocore.exceptions")


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of *exc*, or None if it is not a service error."""
    if isinstance(exc, S3Error):
        return exc.code or None
    bce = _botocore()
    if bce is not None and isinstance(exc, bce.ClientError):
        response = exc.response
        code = response.get("Error", {}).get("Code")
        if code is None:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(status) if status is not None else None
        return str(code)
    return None


def is_not_found(exc: BaseException) -> bool:
    """True if *exc* says the object (not the bucket) does not exist."""
    return error_code(exc) in NOT_FOUND_CODES


def is_temp_failure(exc: BaseException) -> bool:
    """True if retrying the same request later may succeed (network, throttling, 5xx)."""
    bce = _botocore()
    if bce is not None and isinstance(
        exc,
        bce.EndpointConnectionError
        | bce.ConnectionClosedError
        | bce.ConnectTimeoutError
        | bce.ReadTimeoutError
        | bce.ResponseStreamingError,
    ):
        return True
    code = error_code(exc)
    return code is not None and code in TEMP_FAILURE_CODES
