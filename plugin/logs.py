"""Logging setup. Everything goes to stdout: dockerd shows a plugin's stderr as ERROR."""

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(threadName)s [%(name)s] %(message)s"
LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
