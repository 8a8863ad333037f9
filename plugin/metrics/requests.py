"""Plugin requests by endpoint and outcome, with their latency.

Installed as a WSGI wrapper around the API's Flask app (plugin.api.create_app): the one place
every request dockerd sends passes through once. Labels are bounded: the endpoint is one of
the nine protocol paths or `other`, the outcome one of `OUTCOMES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

#: ok: answered (HTTP 200); error: the operation failed, Docker shows the Err (500);
#: rejected: a request that is not the protocol's (unknown path, bad method, too large: 4xx).
OUTCOMES = ("ok", "error", "rejected")
#: Docker's Mount deadline is two minutes; Get and List answer in well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def outcome_of(status: str) -> str:
    """`200 OK` -> ok; 5xx -> error; anything else -> rejected."""
    code = status.split(" ", 1)[0]
    if code == "200":
        return "ok"
    return "error" if code.startswith("5") else "rejected"


def request_series(
    registry: CollectorRegistry,
    prefix: str,
    by: str,
    counted: str,
    timed: str,
    buckets: tuple[float, ...],
) -> tuple[Counter, Histogram]:
    """`<prefix>_requests` by *by* and outcome, and `<prefix>_request_duration_seconds`
    by *by*; *counted* and *timed* are their help texts."""
    requests = Counter(f"{prefix}_requests", counted, (by, "outcome"), registry=registry)
    latency = Histogram(
        f"{prefix}_request_duration_seconds", timed, (by,), buckets=buckets, registry=registry
    )
    return requests, latency


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests, self.latency = request_series(
            registry,
            "stowage_plugin",
            "endpoint",
            "Requests from dockerd to the plugin, by endpoint and outcome.",
            "Time to answer a plugin request, by endpoint.",
            LATENCY_BUCKETS,
        )

    def observe(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)

    def wrap(self, app: WsgiApp, endpoints: Iterable[str]) -> WsgiApp:
        """`app`, counting and timing every request; paths not in `endpoints` are `other`."""
        known = frozenset(endpoints)

        def instrumented(environ: dict[str, Any], start_response: StartResponse) -> Any:
            path = environ.get("PATH_INFO", "")
            endpoint = path.lstrip("/") if path in known else "other"
            started = time.monotonic()
            status = ["500 INTERNAL SERVER ERROR"]

            def recording_start_response(status_line: str, *args: Any) -> Any:
                status[0] = status_line
                return start_response(status_line, *args)

            try:
                return app(environ, recording_start_response)
            finally:
                self.observe(endpoint, outcome_of(status[0]), time.monotonic() - started)

        return instrumented
