"""Volume names: validation and a reversible encoding into one safe path component.

Docker validates names only for its own `local` driver; plugins get whatever the user typed,
including `/` (`tenant1/data`) and hostile input (`../../etc`). A name is stored and shown as
given, but touches the filesystem only through `encode_name`.
"""

from urllib.parse import quote, unquote

from plugin.errors import InvalidNameError

#: Encoded names must fit in one path component (255 bytes on Linux) with room for suffixes.
MAX_ENCODED_LENGTH = 200


def validate_name(name: object) -> str:
    """Return `name` if it is acceptable, else raise InvalidNameError saying why."""
    if not isinstance(name, str):
        raise InvalidNameError("volume name must be a string")
    if not name:
        raise InvalidNameError("volume name must not be empty")
    if "\0" in name:
        raise InvalidNameError("volume name must not contain NUL characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidNameError("volume name must not contain control characters")
    for component in name.split("/"):
        if component == "":
            raise InvalidNameError(
                f"volume name {name!r} has an empty path component "
                "(leading, trailing or doubled '/')"
            )
        if component in (".", ".."):
            raise InvalidNameError(f"volume name {name!r} must not contain '.' or '..' components")
    if len(encode_name(name)) > MAX_ENCODED_LENGTH:
        raise InvalidNameError(
            f"volume name is too long ({len(name)} characters; at most about "
            f"{MAX_ENCODED_LENGTH} ASCII characters fit)"
        )
    return name


def encode_name(name: str) -> str:
    """Percent-encode everything but [A-Za-z0-9_.-~], so `/` can never reach a path."""
    return quote(name, safe="")


def decode_name(encoded: str) -> str:
    return unquote(encoded)
