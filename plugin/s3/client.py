"""boto3 client construction: the general S3 client every path falls back to.

Endpoints are always explicit (S3-compatible servers, loopback in tests) and timeouts are short:
a FUSE request blocked on a dead endpoint for minutes looks like a hung mount to the user.
Credentials come only from botocore's whole chain (environment, shared files and profiles,
web identity, SSO, container credentials, the instance metadata service), never from
command-line arguments, which other users can read in /proc; nothing here writes os.environ.
Every request the client makes is reported to `plugin.s3.observe`. Importing this module
imports boto3 (hundreds of ms): the FUSE launcher preloads it before forking, and everything
else imports it only when it builds a client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import boto3
import botocore.config
import botocore.session

from plugin.s3 import observe
from plugin.s3.errors import (
    NOT_FOUND_CODES,
    TEMP_FAILURE_CODES,
    error_code,
    is_not_found,
    is_temp_failure,
)
from plugin.s3.settings import S3Settings

log = logging.getLogger(__name__)

__all__ = [
    "NOT_FOUND_CODES",
    "TEMP_FAILURE_CODES",
    "S3Settings",
    "error_code",
    "is_not_found",
    "is_temp_failure",
    "make_s3_client",
]

#: Context key of a request's start time (monotonic seconds), set before each call.
_STARTED = "stowage_started"


def _before_call(model: Any = None, context: Any = None, **_: Any) -> None:
    if isinstance(context, dict):
        context[_STARTED] = time.monotonic()
        context["stowage_operation"] = getattr(model, "name", "S3")


def _elapsed(context: Any) -> float:
    started = context.get(_STARTED) if isinstance(context, dict) else None
    return time.monotonic() - started if isinstance(started, float) else 0.0


def _after_call(
    http_response: Any = None, parsed: Any = None, model: Any = None, context: Any = None, **_: Any
) -> None:
    try:
        status = int(getattr(http_response, "status_code", 0))
        outcome = "ok"
        if status >= 300:
            code = (parsed or {}).get("Error", {}).get("Code") if isinstance(parsed, dict) else None
            outcome = str(code or status)
        observe.record(getattr(model, "name", "S3"), outcome, _elapsed(context))
    except Exception:  # the observer path must never fail a request
        log.debug("cannot observe a boto3 call", exc_info=True)


def _after_call_error(context: Any = None, **_: Any) -> None:
    operation = context.get("stowage_operation", "S3") if isinstance(context, dict) else "S3"
    observe.record(str(operation), "error", _elapsed(context))


def observe_client(client: Any) -> Any:
    """Report every request *client* makes to `plugin.s3.observe` (returns *client*)."""
    events = client.meta.events
    events.register("before-call.s3", _before_call)
    events.register("after-call.s3", _after_call)
    events.register("after-call-error.s3", _after_call_error)
    return client


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
    client = session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region or "us-east-1",
        config=config,
        verify=settings.ca_bundle,
    )
    return observe_client(client)
