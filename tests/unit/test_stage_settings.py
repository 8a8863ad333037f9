"""`stowage serve --stage-cache/--stage-cache-size/--staging-jobs`: parsed, env equivalents,
and a clear error naming the flag for a bad value."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from plugin.settings import (
    ENV_STAGE_CACHE,
    ENV_STAGE_CACHE_SIZE,
    ENV_STAGING_JOBS,
    add_serve_arguments,
    settings_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_have_no_cache_and_four_jobs() -> None:
    settings = settings_from_args(parse())
    assert settings.stage_cache is None
    assert settings.staging_jobs == 4
    assert settings.stage_cache_bytes == 20 * 2**30


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_args(
        parse("--stage-cache", "/var/cache/st/", "--stage-cache-size", "2G", "--staging-jobs", "9")
    )
    assert settings.stage_cache == Path("/var/cache/st")
    assert settings.stage_cache_bytes == 2 * 2**30
    assert settings.staging_jobs == 9
    monkeypatch.setenv(ENV_STAGE_CACHE, "/srv/cache")
    monkeypatch.setenv(ENV_STAGE_CACHE_SIZE, "512M")
    monkeypatch.setenv(ENV_STAGING_JOBS, "2")
    settings = settings_from_args(parse())
    assert (settings.stage_cache, settings.stage_cache_bytes, settings.staging_jobs) == (
        Path("/srv/cache"),
        512 * 2**20,
        2,
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--stage-cache", "relative/dir"), "--stage-cache 'relative/dir': give an absolute"),
        (("--stage-cache-size", "lots"), "--stage-cache-size 'lots'"),
        (("--stage-cache-size", "10K"), "--stage-cache-size '10K': give at least"),
        (("--staging-jobs", "0"), "--staging-jobs '0'"),
        (("--staging-jobs", "x"), "--staging-jobs 'x'"),
    ],
)
def test_bad_values_name_the_flag(
    argv: tuple[str, ...], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert named in capsys.readouterr().err


def test_daemon_refuses_a_cache_directory_owned_by_someone_else(tmp_path: Path) -> None:
    from plugin.server import ServeError, serve
    from plugin.settings import Settings

    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 1234, 1234)
    settings = Settings(socket_path=tmp_path / "s.sock", root=tmp_path / "root", stage_cache=cache)
    with pytest.raises(ServeError, match=r"--stage-cache .*cache"):
        serve(settings)
    assert not settings.socket_path.exists()
