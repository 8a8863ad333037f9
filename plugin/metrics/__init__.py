"""Prometheus metrics of `stowage serve --metrics HOST:PORT` (docs/metrics.md lists them).

Everything lives in one `CollectorRegistry` of our own (never prometheus_client's global one,
which would add the process and platform collectors of whatever imported it first) and is
served by prometheus_client's small HTTP server on a daemon thread of its own: never on the
plugin's socket, whose threads belong to dockerd.

Where the numbers come from:
- plugin requests: counted where the API answers them (`RequestMetrics`, a WSGI wrapper
  installed by plugin.api.create_app);
- volumes, mounts, staging and FUSE processes: read when Prometheus scrapes, from the driver's
  public view (List, and Get's Status) and from the counters each FUSE process writes into its
  volume's state directory (`VolumeCollector`), so no copy or filesystem code is instrumented
  and a scrape always agrees with `docker volume inspect`;
- S3 requests: an observer the S3 layer calls after each request (`S3Metrics`).
"""

from __future__ import annotations

import socket


class MetricsError(Exception):
    """The metrics endpoint cannot be served; the message says why."""


def listen_host(host: str) -> str:
    """An empty host means every (IPv4) interface, as in `:9479`."""
    return host or "0.0.0.0"


def check_address(address: tuple[str, int]) -> None:
    """Fail early, before the plugin starts, if the address cannot be bound (in use, not an
    address of this host, a name that does not resolve): a clear error beats a worker that
    dies at boot."""
    host, port = listen_host(address[0]), address[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _name, sockaddr = infos[0]
        probe = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
        finally:
            probe.close()
    except OSError as exc:
        raise MetricsError(
            f"cannot serve metrics on {host}:{port} (--metrics): {exc.strerror or exc}"
        ) from None
