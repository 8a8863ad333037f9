import pytest

from plugin.backends.local import LocalBackend
from plugin.errors import InvalidOptionError
from plugin.options import (
    check_options,
    parse_bool,
    parse_id,
    parse_mode,
    parse_size,
    split_backend,
)

BACKENDS = ["local", "s3"]


def test_null_opts_mean_local_backend_without_options() -> None:
    assert split_backend(None, BACKENDS) == ("local", {})
    assert split_backend({}, BACKENDS) == ("local", {})


def test_keys_are_normalised() -> None:
    assert split_backend({"Backend": "LOCAL", "Read-Only": "1"}, BACKENDS) == (
        "local",
        {"read_only": "1"},
    )


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(
        InvalidOptionError, match=r"unknown backend 'nfs'; valid backends: local, s3"
    ):
        split_backend({"backend": "nfs"}, BACKENDS)


def test_duplicate_key_after_normalisation_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="given twice"):
        split_backend({"read-only": "1", "read_only": "0"}, BACKENDS)


def test_unknown_option_is_named_and_valid_ones_listed() -> None:
    with pytest.raises(InvalidOptionError) as err:
        check_options("local", {"sise": "10G"}, LocalBackend.option_specs)
    assert "unknown option 'sise'" in str(err.value)
    assert "valid options: backend, gid, mode, path, readonly, size, uid" in str(err.value)


@pytest.mark.parametrize("key", ["secret_key", "access_key_id", "password", "aws_session_token"])
def test_secret_looking_options_are_refused_with_a_pointer_to_profiles(key: str) -> None:
    with pytest.raises(InvalidOptionError, match=r"looks like a credential.*profile"):
        check_options("local", {key: "x"}, LocalBackend.option_specs)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"uid": "root"}, "option uid='root': expected a numeric id"),
        ({"uid": "-1"}, "expected a numeric id"),
        ({"mode": "999"}, "expected an octal mode"),
        ({"mode": "17777"}, "out of range"),
        ({"readonly": "maybe"}, "expected true or false"),
        ({"path": "relative/dir"}, "absolute"),
    ],
)
def test_bad_values_name_the_option(opts: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        check_options("local", opts, LocalBackend.option_specs)


def test_value_parsers() -> None:
    assert parse_mode("0755") == parse_mode("755") == parse_mode("0o755") == 0o755
    assert parse_id("1000") == 1000
    assert parse_bool("TRUE") and parse_bool("yes") and not parse_bool("0")


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("512K", 512 << 10), ("8M", 8 << 20), ("8MiB", 8 << 20), ("8mb", 8 << 20),
     ("1.5G", 3 << 29), (" 2T ", 2 << 40)],
)  # fmt: skip
def test_sizes_read_like_rsync_and_rclone(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "12X", "1e3", "8 M B"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size such as 512M"):
        parse_size(text)
