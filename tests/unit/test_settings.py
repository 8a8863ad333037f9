"""`stowage serve` settings: flags win over env, env over defaults (managed plugins use env)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from plugin.settings import (
    ENV_CREDENTIALS_FILE,
    ENV_ROOT,
    ENV_S3_ENDPOINT,
    ENV_S3_REGION,
    add_serve_arguments,
    settings_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_credentials_file_defaults_to_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CREDENTIALS_FILE, raising=False)
    monkeypatch.delenv(ENV_ROOT, raising=False)
    settings = settings_from_args(parse("--root", "/srv/st"))
    assert settings.credentials_path == Path("/srv/st/credentials")


def test_credentials_file_from_env_then_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CREDENTIALS_FILE, "/etc/stowage/credentials")
    assert settings_from_args(parse()).credentials_path == Path("/etc/stowage/credentials")
    flagged = settings_from_args(parse("--credentials-file", "/run/keys/s3"))
    assert flagged.credentials_path == Path("/run/keys/s3")


def test_root_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ROOT, "/srv/env-root")
    assert settings_from_args(parse()).root == Path("/srv/env-root")


def test_s3_defaults_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_S3_ENDPOINT, "http://127.0.0.1:9000")
    monkeypatch.setenv(ENV_S3_REGION, "eu-west-1")
    settings = settings_from_args(parse())
    assert settings.s3_defaults == {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1"}
    monkeypatch.delenv(ENV_S3_ENDPOINT)
    monkeypatch.delenv(ENV_S3_REGION)
    assert settings_from_args(parse()).s3_defaults == {}


def test_bad_default_endpoint_is_refused_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--s3-endpoint", "127.0.0.1:9000")
    assert "S3 endpoint '127.0.0.1:9000'" in capsys.readouterr().err
