"""--metrics and --log-format (and their env equivalents): parsed strictly, with errors that
name the flag, the variable and what is expected."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin.metrics import MetricsError, check_address
from plugin.settings import (
    ENV_LOG_FORMAT,
    ENV_METRICS,
    ENV_REGISTRY_ENDPOINT,
    ENV_S3_ENDPOINT,
    add_serve_arguments,
    parse_metrics_address,
    settings_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stowage serve", exit_on_error=False)
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="stowage serve")
    add_serve_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_METRICS, ENV_LOG_FORMAT, ENV_S3_ENDPOINT, ENV_REGISTRY_ENDPOINT):
        monkeypatch.delenv(name, raising=False)


def test_metrics_and_json_logs_are_off_by_default() -> None:
    settings = settings_from_args(parse())
    assert settings.metrics is None
    assert settings.log_format == "text"


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    flagged = settings_from_args(parse("--metrics", "127.0.0.1:9479", "--log-format", "JSON"))
    assert flagged.metrics == ("127.0.0.1", 9479)
    assert flagged.log_format == "json"
    monkeypatch.setenv(ENV_METRICS, "[::1]:9100")
    monkeypatch.setenv(ENV_LOG_FORMAT, "json")
    from_env = settings_from_args(parse())
    assert from_env.metrics == ("::1", 9100)
    assert from_env.log_format == "json"
    assert settings_from_args(parse("--metrics", ":9479")).metrics == ("", 9479)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("9479", "expected HOST:PORT"),
        ("localhost:0", "PORT must be a number from 1 to 65535"),
        ("localhost:70000", "PORT must be a number from 1 to 65535"),
        ("localhost:http", "PORT must be a number"),
        ("::1:9479", "IPv6 in brackets"),
        ("[nope]:9479", "not an IPv6 address"),
        ("a b:9479", "HOST must be a host name or an IP address"),
    ],
)
def test_bad_metrics_address_names_flag_and_env(
    capsys: pytest.CaptureFixture[str], value: str, says: str
) -> None:
    err = usage_error(capsys, "--metrics", value)
    assert says in err
    assert "--metrics" in err and ENV_METRICS in err and repr(value) in err


def test_bad_env_value_is_a_usage_error_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_METRICS, "nonsense")
    assert "expected HOST:PORT" in usage_error(capsys)
    monkeypatch.delenv(ENV_METRICS)
    monkeypatch.setenv(ENV_LOG_FORMAT, "xml")
    err = usage_error(capsys)
    assert "'xml'" in err and ENV_LOG_FORMAT in err and "text or json" in err


@given(st.text(max_size=60))
def test_any_text_parses_or_is_refused_cleanly(value: str) -> None:
    try:
        host, port = parse_metrics_address(value)
    except argparse.ArgumentTypeError as exc:
        assert "metrics address" in str(exc)
        return
    assert 1 <= port <= 65535
    assert int(value.rpartition(":")[2]) == port
    assert "/" not in host and " " not in host


@given(st.integers(1, 65535), st.sampled_from(["127.0.0.1", "localhost", "", "[::1]"]))
def test_valid_addresses_round_trip(port: int, host: str) -> None:
    assert parse_metrics_address(f"{host}:{port}") == (host.strip("[]"), port)


def test_endpoint_errors_name_their_own_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """One helper builds the S3 and registry endpoint flags: each error names its own."""
    err = usage_error(capsys, "--registry-endpoint", "ftp://x")
    assert "--registry-endpoint" in err and ENV_REGISTRY_ENDPOINT in err
    assert ENV_S3_ENDPOINT not in err
    err = usage_error(capsys, "--s3-endpoint", "ftp://x")
    assert "--s3-endpoint" in err and ENV_S3_ENDPOINT in err


def test_an_address_in_use_is_refused_before_start() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
            check_address(("127.0.0.1", port))


def test_managed_plugin_can_set_metrics_and_json_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json: both are settable env entries whose defaults parse (metrics off), and the
    plugin shares the host's network, so the metrics port is a port of the host."""
    config = json.loads((Path(__file__).parents[2] / "config.json").read_text())
    assert config["network"]["type"] == "host"
    env = {e["name"]: e for e in config["env"]}
    for name in (ENV_METRICS, ENV_LOG_FORMAT):
        assert env[name]["settable"] == ["value"]
        monkeypatch.setenv(name, env[name]["value"])
    settings = settings_from_args(parse())
    assert settings.metrics is None and settings.log_format == "text"
    monkeypatch.setenv(ENV_METRICS, "127.0.0.1:9479")
    assert settings_from_args(parse()).metrics == ("127.0.0.1", 9479)
