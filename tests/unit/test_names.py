import pytest

from plugin.errors import InvalidNameError
from plugin.names import decode_name, encode_name, validate_name


@pytest.mark.parametrize(
    "name", ["data", "my_vol-1.2", "tenant1/test", "a/b/c", "ünïcødé", "with space", "...", "~x"]
)
def test_valid_names_round_trip_to_one_safe_component(name: str) -> None:
    assert validate_name(name) == name
    encoded = encode_name(name)
    assert "/" not in encoded and encoded not in (".", "..")
    assert decode_name(encoded) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("a\0b", "NUL"),
        ("a\nb", "control characters"),
        (".", "'.' or '..'"),
        ("..", "'.' or '..'"),
        ("../../etc", "'.' or '..'"),
        ("a/../b", "'.' or '..'"),
        ("a/./b", "'.' or '..'"),
        ("/abs", "empty path component"),
        ("a//b", "empty path component"),
        ("trailing/", "empty path component"),
        ("x" * 201, "too long"),
        ("é" * 40, "too long"),  # 40 characters, but 240 bytes once encoded
        (None, "must be a string"),
        (42, "must be a string"),
    ],
)
def test_hostile_names_are_refused_with_the_reason(name: object, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_name(name)


def test_distinct_names_never_share_a_directory() -> None:
    names = ["a/b", "a%2Fb", "a_b", "A/b", "a b", "a+b"]
    assert len({encode_name(n) for n in names}) == len(names)
