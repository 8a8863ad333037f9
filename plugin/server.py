"""`stowage serve`: the Flask app under gunicorn on the plugin's unix socket.

gunicorn settings, each for a reason from Docker's side (docs/protocol.md §6):
- one worker process: the registry and its locks are in-process; two workers would split them;
- our own worker class (plugin.httpworker), not gthread: requests are read whole by an event
  loop before a thread is committed, and Get, List, Path and Capabilities run on threads of
  their own, so neither slow or idle clients nor Mounts waiting for stage-in starve them
  (issue 12); `threads` sizes the pool of the other endpoints, which may wait for minutes;
- worker_connections: open connections at most (idle ones cost a descriptor, no thread);
- timeout 150 s: above Docker's 2-minute Create/Mount deadline, so no slow Mount is killed;
- graceful_timeout 8 s: below Docker's and systemd's 10 s before SIGKILL;
- umask 0117: the socket is created mode 0660, owned by root;
- keepalive: dockerd reuses its HTTP connection to the plugin.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from plugin.httpworker import PluginWorker
from plugin.logs import LOG_FORMAT, setup_logging
from plugin.settings import Settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 150
GRACEFUL_TIMEOUT_S = 8
#: Concurrent Create/Mount/Unmount/Remove: a Mount waiting for stage-in holds one for up to
#: 110 s, and a compose project mounts dozens at once. Idle threads cost little.
THREADS = 128
MAX_CONNECTIONS = 1000


class ServeError(Exception):
    """The daemon cannot start; the message says why."""


def check_socket_path(path: str) -> None:
    """Refuse to steal the socket of a live daemon; a stale one from a dead run is replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServeError(f"{path} exists and is not a socket; move it away or pick --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except OSError:
        log.info("replacing stale socket %s", path)
        return
    finally:
        probe.close()
    raise ServeError(f"another process is already serving on {path}; stop it first")


def _gunicorn_logconfig(level: str, log_format: str = "text") -> dict[str, Any]:
    """gunicorn logs to stderr by default, which dockerd reports as ERROR; use stdout."""
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"}
    formatter: dict[str, Any] = (
        {"()": "plugin.logs.JsonFormatter"} if log_format == "json" else {"format": LOG_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": formatter},
        "handlers": {"stdout": handler},
        "root": {"level": level.upper(), "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "propagate": True},
            "gunicorn.access": {"level": "WARNING", "propagate": True},
        },
    }


class PluginServer(BaseApplication):  # type: ignore[misc]  # untyped base class
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.driver: Any = None
        self.metrics: Any = None
        #: Request paths answered from memory, run apart from slow ones by PluginWorker.
        self.quick_paths: frozenset[str] = frozenset()
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"unix:{self.settings.socket_path}"],
            "workers": 1,
            "worker_class": PluginWorker,
            "threads": THREADS,
            "worker_connections": MAX_CONNECTIONS,
            "timeout": REQUEST_TIMEOUT_S,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "keepalive": 75,
            "umask": 0o117,
            "proc_name": "stowage",
            "preload_app": False,
            "logconfig_dict": _gunicorn_logconfig(
                self.settings.log_level, self.settings.log_format
            ),
            "accesslog": None,
            "control_socket_disable": True,
            "worker_exit": self._worker_exit,
        }
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Callable[..., Any]:
        """Runs in the worker after fork: build the driver, serve at once, recover behind."""
        # Imported here so the master binds the socket before the slow imports happen.
        from plugin.api import create_app, protocol
        from plugin.wiring import build_driver

        setup_logging(self.settings.log_level, self.settings.log_format)
        self.driver = build_driver(self.settings)
        instrument = None
        if self.settings.metrics is not None:
            from plugin.wiring import build_metrics

            self.metrics = build_metrics(self.settings, self.driver)
            self.metrics.serve(self.settings.metrics)
            instrument = self.metrics.requests.wrap
        threading.Thread(target=self.driver.recover, name="recovery", daemon=True).start()
        self.quick_paths = protocol.QUICK_ENDPOINTS
        return create_app(self.driver, instrument)

    def _worker_exit(self, _server: Any, _worker: Any) -> None:
        # Mounts are deliberately left in place: containers keep using them across a restart.
        if self.metrics is not None:
            self.metrics.close()
        if self.driver is not None:
            self.driver.close()


def serve(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    socket_dir = settings.socket_path.parent
    socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_socket_path(str(settings.socket_path))
    if settings.metrics is not None:
        from plugin.metrics import MetricsError, check_address

        try:
            check_address(settings.metrics)
        except MetricsError as exc:
            raise ServeError(str(exc)) from None
    if settings.stage_cache is not None:
        # Checked before serving: a worker that cannot start would be restarted forever.
        from plugin.errors import PluginError
        from plugin.wiring import build_stage_cache

        try:
            cache = build_stage_cache(settings)
        except PluginError as exc:
            raise ServeError(str(exc)) from None
        if cache is not None:
            cache.close()
    log.info(
        "stowage serving on %s, root %s, allowed paths: %s",
        settings.socket_path,
        settings.root,
        ", ".join(map(str, settings.allowed_paths)) or "(none)",
    )
    PluginServer(settings).run()
