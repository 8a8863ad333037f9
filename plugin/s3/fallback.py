"""The fast-path rule, in one place: try the hand-signed request; if it raises
`FastPathError` (the path is off, the server answered something unexpected, the connection
broke), log why and ask the general client (boto3 or the CRT), whose answer or error is the
one the caller gets. A missing fast client (None) goes straight to the general one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from plugin.s3.errors import FastPathError

log = logging.getLogger(__name__)

T = TypeVar("T")


def fast_or_fallback(what: str, fast: Callable[[], T] | None, fallback: Callable[[], T]) -> T:
    """*fast*() unless it raises FastPathError (or is None), else *fallback*()."""
    if fast is not None:
        try:
            return fast()
        except FastPathError as exc:
            log.debug("fast %s: %s; using the general client", what, exc)
    return fallback()


async def fast_or_fallback_async(
    what: str,
    fast: Callable[[], Awaitable[T]] | None,
    fallback: Callable[[], Awaitable[T]],
) -> T:
    """`fast_or_fallback` for awaitables (the FUSE process runs the blocking calls in
    worker threads)."""
    if fast is not None:
        try:
            return await fast()
        except FastPathError as exc:
            log.debug("fast %s: %s; using the general client", what, exc)
    return await fallback()
