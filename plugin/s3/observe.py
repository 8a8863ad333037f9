"""One observation hook for every S3 request, whichever client sends it (fast path, CRT,
boto3), so metrics need no knowledge of the clients.

`set_request_observer(fn)` installs `fn(operation, outcome, seconds)`: *operation* is the S3
API name ("GetObject", "ListObjectsV2", ...), *outcome* "ok", an S3 error code, or "error"
(no answer: connection or timeout). The observer runs on the request's thread, after the
request; whatever it raises is logged and dropped, never seen by the request path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

RequestObserver = Callable[[str, str, float], None]


def _nothing(operation: str, outcome: str, seconds: float) -> None:
    """The default observer."""


_observer: RequestObserver = _nothing


def set_request_observer(fn: RequestObserver | None) -> None:
    """Install *fn* as the observer of every S3 request (None: back to the no-op)."""
    global _observer
    _observer = fn if fn is not None else _nothing


def record(operation: str, outcome: str, seconds: float) -> None:
    """Report one finished request to the observer; never raises."""
    try:
        _observer(operation, outcome, seconds)
    except Exception:  # a broken observer must not fail the request it observes
        log.debug("request observer failed for %s", operation, exc_info=True)


class Outcome:
    """What `observed` reports; the request path may set `outcome` before leaving."""

    def __init__(self) -> None:
        self.outcome = "ok"


@contextmanager
def observed(operation: str) -> Iterator[Outcome]:
    """Time the block and report it: "ok", what the block set as outcome, or, when it
    raises, the exception's S3 code (attribute `code`) or "error"."""
    result = Outcome()
    started = time.monotonic()
    try:
        yield result
    except BaseException as exc:
        code = getattr(exc, "code", None)
        result.outcome = code if isinstance(code, str) and code else "error"
        raise
    finally:
        record(operation, result.outcome, time.monotonic() - started)
