"""Logging setup. Everything goes to stdout: dockerd shows a plugin's stderr as ERROR.

Two formats: `text` (one human-readable line per record) and `json` (one JSON object per line,
for log shippers: `time`, `level`, `logger`, `message`, `process`, `thread`, and `exception`
when there is a traceback). The FUSE processes are started with the daemon's format
(`child_log_arguments`), so every log line of a host has one shape.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(threadName)s [%(name)s] %(message)s"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

_current_format = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument that is not JSON-serialisable is already a string
        # in "message"; this only guards against odd values in the fields above.
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(LOG_FORMAT)
    raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")


def setup_logging(level: str, log_format: str = "text") -> None:
    global _current_format
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(make_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _current_format = log_format


def child_log_arguments() -> list[str]:
    """Command-line arguments that give a child process (a FUSE process) this process's log
    format; empty for the default, so command lines stay as they were."""
    return ["--log-format", _current_format] if _current_format != "text" else []
