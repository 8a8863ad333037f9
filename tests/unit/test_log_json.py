"""`--log-format json`: one JSON object per log line, whatever the message holds."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin import logs

KEYS = {"time", "level", "logger", "message", "process", "thread"}


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_current_format", "text")  # restored after the test
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("plugin.x", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_record_is_one_json_object_with_the_documented_keys() -> None:
    line = logs.JsonFormatter().format(record("mounted %s (%d mounts)", "vol", 2))
    entry = json.loads(line)
    assert set(entry) >= KEYS
    assert entry["message"] == "mounted vol (2 mounts)"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "plugin.x"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert "exception" not in entry


def test_a_traceback_stays_inside_the_one_line() -> None:
    line = logs.JsonFormatter().format(record("failed", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exception"]
    assert "Traceback" in entry["exception"]


@given(st.text())
def test_any_message_is_one_parseable_line(message: str) -> None:
    line = logs.JsonFormatter().format(record("%s", message))
    assert "\n" not in line and "\r" not in line
    assert json.loads(line)["message"] == message


def test_setup_logging_json_writes_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("info", "json")
    logging.getLogger("plugin.test").info("hello %s", "world")
    logging.getLogger("plugin.test").debug("not shown")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert json.loads(out[0])["message"] == "hello world"


def test_text_stays_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("info")
    logging.getLogger("plugin.test").info("plain")
    out = capsys.readouterr().out
    assert "[plugin.test] plain" in out
    assert logs.child_log_arguments() == []


def test_fuse_processes_get_the_daemons_format() -> None:
    logs.setup_logging("info", "json")
    assert logs.child_log_arguments() == ["--log-format", "json"]


def test_unknown_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'yaml'.*text, json"):
        logs.make_formatter("yaml")


def test_gunicorn_logs_use_the_same_format() -> None:
    from plugin.server import _gunicorn_logconfig

    config = _gunicorn_logconfig("info", "json")
    stream = io.StringIO()
    logging.config.dictConfig(config)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("gunicorn.error").info("Booting worker")
    assert json.loads(stream.getvalue())["logger"] == "gunicorn.error"
