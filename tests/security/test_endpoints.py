"""Security attack 6: credentials in an endpoint URL (`http://user:password@host`).

An endpoint is shown by `docker volume inspect`, logged, and put on the FUSE process's command
line, so user information in it is refused wherever an endpoint enters stowage: volume options
(S3 volumes and S3 staging), the daemon's --s3-endpoint and STOWAGE_S3_ENDPOINT, and the
--endpoint of `stowage cp` and `stowage volume backup|restore`. The refusal says where
credentials go instead and never repeats the password.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.backends.local import LocalBackend
from plugin.backends.s3 import S3Backend
from plugin.cli import main as stowage_main
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import InvalidOptionError, VolumeNotFoundError
from plugin.options import check_options, check_url, endpoint_arg
from plugin.settings import ENV_S3_ENDPOINT, Settings, add_serve_arguments, settings_from_args
from plugin.wiring import build_backends

PASSWORD = "hunter2-Sekr3t"
WITH_PASSWORD = f"http://alice:{PASSWORD}@127.0.0.1:9000"
USER_ONLY = "https://alice@s3.example.com"
HOSTILE = [
    WITH_PASSWORD,
    USER_ONLY,
    f"https://alice:{PASSWORD}@s3.example.com/path",
    f"http://alice:{PASSWORD}@@host",  # an unencoded '@' in the password
    f"http://alice:{PASSWORD}/x@host",  # an unencoded '/' in the password
    f"ftp://alice:{PASSWORD}@host",  # wrong scheme too: the userinfo is still not echoed
    f"alice:{PASSWORD}@host:9000",  # no scheme
]


def assert_refusal(message: str, *, daemon: bool) -> None:
    assert PASSWORD not in message
    assert "alice" not in message
    assert "***@" in message, "the URL is shown with its user information masked"
    assert "user information" in message
    assert "AWS_ACCESS_KEY_ID" in message and "instance or container role" in message
    if daemon:
        assert "--credentials-file" in message and "-o profile=NAME" in message
    else:
        assert "--profile NAME" in message


# -- volume options ------------------------------------------------------------------------


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[VolumeDriver]:
    settings = Settings(root=tmp_path / "root")
    settings.root.mkdir()
    made = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    yield made
    made.close()


@pytest.mark.parametrize("url", HOSTILE)
@pytest.mark.parametrize(
    "options",
    [
        {"backend": "s3", "bucket": "bucket"},
        {"stage_out": "s3://bucket/prefix"},  # a staged local volume
    ],
    ids=["s3-volume", "staged-volume"],
)
def test_volume_option_endpoint_with_userinfo_is_refused(
    driver: VolumeDriver, options: dict[str, str], url: str
) -> None:
    with pytest.raises(InvalidOptionError) as raised:
        driver.create("v", {**options, "endpoint": url})
    assert_refusal(str(raised.value), daemon=True)
    assert str(raised.value).startswith("option endpoint=")
    with pytest.raises(VolumeNotFoundError):
        driver.get("v")


# -- the daemon's default endpoint ---------------------------------------------------------


def parse_serve(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("url", HOSTILE)
def test_s3_endpoint_flag_with_userinfo_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_S3_ENDPOINT, raising=False)
    with pytest.raises(SystemExit):
        parse_serve("--s3-endpoint", url)
    assert_refusal(capsys.readouterr().err, daemon=True)


@pytest.mark.parametrize("url", [WITH_PASSWORD, USER_ONLY])
def test_s3_endpoint_env_with_userinfo_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_S3_ENDPOINT, url)
    with pytest.raises(SystemExit):
        settings_from_args(parse_serve())
    err = capsys.readouterr().err
    assert_refusal(err, daemon=True)
    assert ENV_S3_ENDPOINT in err


# -- the CLIs --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", HOSTILE)
@pytest.mark.parametrize(
    "argv",
    [
        ["cp", "/tmp/src", "s3://bucket/prefix"],
        ["volume", "backup", "v", "s3://bucket/prefix"],
        ["volume", "restore", "s3://bucket/prefix", "v"],
    ],
    ids=["cp", "volume-backup", "volume-restore"],
)
def test_cli_endpoint_with_userinfo_is_refused(
    argv: list[str], url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        stowage_main([*argv, "--endpoint", url])
    assert raised.value.code == 2  # a usage error: nothing was started
    assert_refusal(capsys.readouterr().err, daemon=False)


# -- properties ------------------------------------------------------------------------------

#: RFC 3986 userinfo: unreserved, sub-delims, percent-encoded (':' separates the password).
USERINFO_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;="
userinfo_text = st.text(USERINFO_CHARS, min_size=1, max_size=20) | st.builds(
    lambda a, b: f"{a}%{b}", st.text(USERINFO_CHARS, max_size=8), st.sampled_from(["40", "2F"])
)
label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
hosts = st.one_of(
    st.lists(label, min_size=1, max_size=4).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.just("[::1]"),
)
ports = st.none() | st.integers(1, 65535)
paths = st.lists(st.text(string.ascii_lowercase + string.digits + "-_.", max_size=8), max_size=3)


def build_url(
    scheme: str, userinfo: str | None, host: str, port: int | None, path: list[str]
) -> str:
    auth = f"{userinfo}@" if userinfo is not None else ""
    netloc = f"{host}:{port}" if port is not None else host
    tail = "/" + "/".join(path) if path else ""
    return f"{scheme}://{auth}{netloc}{tail}"


def option_message(url: str) -> str:
    try:
        check_options("s3", {"endpoint": url}, S3Backend.option_specs)
    except InvalidOptionError as exc:
        return str(exc)
    raise AssertionError(f"accepted {url!r}")


def staged_option_message(url: str) -> str:
    try:
        check_options("local", {"endpoint": url}, LocalBackend.extra_option_specs)
    except InvalidOptionError as exc:
        return str(exc)
    raise AssertionError(f"accepted {url!r}")


def arg_message(url: str) -> str:
    try:
        endpoint_arg(url)
    except argparse.ArgumentTypeError as exc:
        return str(exc)
    raise AssertionError(f"accepted {url!r}")


def serve_message(url: str) -> str:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    try:
        parser.parse_args(["--s3-endpoint", url])
    except argparse.ArgumentError as exc:
        return str(exc)
    raise AssertionError(f"accepted {url!r}")


ENTRY_POINTS: list[Callable[[str], str]] = [
    option_message,
    staged_option_message,
    arg_message,
    serve_message,
]


@settings(max_examples=300, deadline=None, database=None)
@given(
    scheme=st.sampled_from(["http", "https"]),
    user=userinfo_text,
    password=st.none() | st.text(USERINFO_CHARS + ":", max_size=24),
    host=hosts,
    port=ports,
    path=paths,
)
def test_any_userinfo_is_refused_and_the_message_does_not_depend_on_it(
    scheme: str, user: str, password: str | None, host: str, port: int | None, path: list[str]
) -> None:
    userinfo = user if password is None else f"{user}:{password}"
    url = build_url(scheme, userinfo, host, port, path)
    with pytest.raises(ValueError, match="user information"):
        check_url(url)
    # The message is the same whatever the user information: none of it can be in there.
    stand_in = build_url(scheme, "u:p", host, port, path)
    for entry_point in ENTRY_POINTS:
        message = entry_point(url)
        assert message == entry_point(stand_in)
        # And directly, unless the password is a word of the message anyway ("s", "http").
        if password and password not in entry_point(stand_in):
            assert password not in message


@settings(max_examples=300, deadline=None, database=None)
@given(
    scheme=st.sampled_from(["http", "https"]),
    userinfo=st.none() | userinfo_text,
    host=hosts,
    port=ports,
    path=paths,
)
def test_endpoint_is_refused_exactly_when_it_has_userinfo(
    scheme: str, userinfo: str | None, host: str, port: int | None, path: list[str]
) -> None:
    url = build_url(scheme, userinfo, host, port, path)
    if userinfo is None:
        assert check_url(url) == url
        assert endpoint_arg(url) == url
        check_options("s3", {"endpoint": url}, S3Backend.option_specs)
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        assert parser.parse_args(["--s3-endpoint", url]).s3_endpoint == url
    else:
        for entry_point in ENTRY_POINTS:
            assert "***@" in entry_point(url)


@pytest.mark.parametrize(
    "options",
    [
        {"backend": "s3", "bucket": f"alice:{PASSWORD}@bucket"},
        {"stage_out": f"s3://alice:{PASSWORD}@bucket/prefix"},
        {"stage_in": f"s3://alice:{PASSWORD}@bucket/prefix"},
    ],
    ids=["s3-bucket", "stage-out", "stage-in"],
)
def test_bucket_with_userinfo_is_refused(driver: VolumeDriver, options: dict[str, str]) -> None:
    """`s3://user:pw@bucket/...` was accepted and shown by `docker volume inspect`."""
    with pytest.raises(InvalidOptionError) as raised:
        driver.create("v", options)
    assert PASSWORD not in str(raised.value)
    assert "user information" in str(raised.value)
    with pytest.raises(VolumeNotFoundError):
        driver.get("v")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/?X-Amz-Signature=abc", "https://s3.example.com/#token=x"]
)
def test_endpoint_with_a_query_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="no query"):
        check_url(url)
