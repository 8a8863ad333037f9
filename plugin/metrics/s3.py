"""S3 requests by operation and outcome, with their latency.

The S3 layer reports each request to one observer, `fn(operation, outcome, seconds)`
(plugin.s3.observe.set_request_observer): the daemon's own requests (staging, Create's checks,
the shared registry); the FUSE processes' traffic shows in their stowage_fuse_* series. The
outcome (there "ok", an S3 error code, or "error" for no answer) becomes one of `OUTCOMES`.
Operation names come from code, not users, yet are capped all the same, so a bug can never
grow the series without bound: the first `MAX_OPERATIONS` names are kept, later new ones are
counted as `other`.
"""

from __future__ import annotations

import logging
import re
import threading

from prometheus_client import CollectorRegistry

from plugin.metrics.requests import request_series

log = logging.getLogger(__name__)

MAX_OPERATIONS = 40
#: Every value the outcome label takes.
OUTCOMES = ("ok", "not_found", "denied", "throttled", "precondition_failed", "s3_error", "error")
_CODES = {
    "not_found": "NoSuchKey NoSuchBucket NoSuchUpload NotFound 404",
    "denied": "AccessDenied Forbidden 403 InvalidAccessKeyId SignatureDoesNotMatch ExpiredToken",
    "throttled": "SlowDown Throttling ThrottlingException RequestLimitExceeded 503 429",
    "precondition_failed": "PreconditionFailed 412",
    "ok": "ok",
    "error": "error",
}
_OUTCOME_OF_CODE = {code: label for label, codes in _CODES.items() for code in codes.split()}


def outcome_label(outcome: str) -> str:
    """The S3 layer's outcome as one of OUTCOMES; any other S3 error code is `s3_error`."""
    return _OUTCOME_OF_CODE.get(outcome, "s3_error")


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class S3Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests, self.latency = request_series(
            registry,
            "stowage_s3",
            "operation",
            "S3 requests made by the daemon, by operation and outcome.",
            "Time an S3 request took, by operation.",
            LATENCY_BUCKETS,
        )
        self._lock = threading.Lock()
        self._operations: set[str] = set()

    def _bounded(self, value: str, seen: set[str], limit: int) -> str:
        if value in seen:
            return value
        if not isinstance(value, str) or not _LABEL.fullmatch(value):
            return "other"
        with self._lock:
            if len(seen) >= limit:
                return "other"
            seen.add(value)
        return value

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        """The observer given to the S3 layer; never raises into it."""
        try:
            op = self._bounded(operation, self._operations, MAX_OPERATIONS)
            result = outcome_label(outcome)
            self.requests.labels(op, result).inc()
            self.latency.labels(op).observe(max(0.0, float(seconds)))
        except Exception:  # metrics must never fail an S3 request
            log.debug("cannot record an S3 request", exc_info=True)

    def attach(self) -> bool:
        """Register `observe` with the S3 layer; False if this build has no observer hook."""
        try:
            from plugin.s3.observe import set_request_observer  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            log.info("this build's S3 layer reports no requests: no stowage_s3_* series")
            return False
        set_request_observer(self.observe)
        return True
