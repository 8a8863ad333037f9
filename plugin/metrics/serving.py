"""The registry, collectors and HTTP server of `--metrics` in the daemon's worker process."""

from __future__ import annotations

import logging
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from plugin.driver import VolumeDriver
from plugin.metrics import MetricsError, listen_host
from plugin.metrics.requests import RequestMetrics
from plugin.metrics.s3 import S3Metrics
from plugin.metrics.volumes import VolumeCollector

log = logging.getLogger(__name__)


class ServingMetrics:
    """The registry, the collectors and the HTTP server of one daemon worker."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self.s3 = S3Metrics(self.registry)
        self._server: WSGIServer | None = None

    def watch(self, driver: VolumeDriver, s3_state_root: Path) -> None:
        """Report the volumes of `driver`; FUSE counters are found under `s3_state_root`."""
        self.registry.register(VolumeCollector(driver, s3_state_root))

    def serve(self, address: tuple[str, int]) -> tuple[str, int]:
        """Start the HTTP server; returns the address bound (port 0 picks a free one)."""
        host, port = listen_host(address[0]), address[1]
        try:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {host}:{port} (--metrics): {exc.strerror or exc}"
            ) from None
        bound = self._server.server_address
        log.info("serving Prometheus metrics on http://%s:%s/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
