"""Volume options: the typed table each backend declares, and validation against it.

Options arrive as Docker's `map[string]string` (or null). Keys are normalised (case, `-` vs `_`)
so `-o read-only=true` and `-o readonly=true` are not two different things to a user.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from plugin.errors import InvalidOptionError

#: Substrings of option names that look like credentials. Docker shows every option in
#: `docker volume inspect`, so secrets must come from the daemon's side instead.
SECRET_MARKERS = ("access_key", "secret", "password", "passwd", "token", "credential")

BACKEND_OPTION = "backend"
DEFAULT_BACKEND = "local"


@dataclass(frozen=True)
class OptionSpec:
    """One option a backend accepts: how to check its value and what to tell users about it."""

    name: str
    help: str
    check: Callable[[str], object]


def normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_id(value: str) -> int:
    """A uid or gid: a decimal number (names would resolve differently inside containers)."""
    if not value.strip().isdigit():
        raise ValueError(f"expected a numeric id, got {value!r}")
    number = int(value)
    if number > 2**32 - 2:
        raise ValueError(f"id {number} is out of range")
    return number


def parse_mode(value: str) -> int:
    """An octal permission mode such as 0755, 755 or 0o755."""
    text = value.strip().lower().removeprefix("0o")
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"expected an octal mode such as 0755, got {value!r}") from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {value!r} is out of range (0000-7777)")
    return mode


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str) -> int:
    """A byte count: plain, or with a binary K/M/G/T suffix (`512M`, `1.5GiB`, `8mb`), the
    way rsync and rclone read them; shared by volume options and `stowage cp` flags."""
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected a size such as 512M or 2G, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


#: Where S3 credentials go instead of an endpoint URL: the stowage daemon's own sources, and
#: those of the commands that run without it (`stowage cp`, `stowage volume backup|restore`).
DAEMON_CREDENTIALS = (
    "give the stowage daemon its credentials through the AWS chain instead: a profile in its "
    "credentials file (--credentials-file, env STOWAGE_CREDENTIALS_FILE; default "
    "ROOT/credentials; mode 0600; a managed plugin reads it from its credentials mount, "
    "`docker plugin set stowage credentials.source=DIR`) selected with -o profile=NAME, "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment, or an instance or container "
    "role"
)
CLI_CREDENTIALS = (
    "credentials come from the AWS chain instead: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in "
    "the environment, a profile in the shared credentials file (~/.aws/credentials, or "
    "AWS_SHARED_CREDENTIALS_FILE) selected with --profile NAME, or an instance or container role"
)


def redact_userinfo(url: str) -> str:
    """*url* fit to show: anything that may be user information (everything between `//`
    and the last `@`, or before the last `@` without a scheme) becomes `***`."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("//")
    if not sep:
        scheme, rest = "", url
    return f"{scheme}{sep}***{rest[rest.rfind('@') :]}"


def check_url(value: str, credentials_hint: str = DAEMON_CREDENTIALS) -> str:
    """An S3 endpoint URL, `http(s)://host[:port][/path]`: the one check of every endpoint
    stowage accepts (volume options, --s3-endpoint, the CLIs' --endpoint).

    User information (`user:password@`) is refused: an endpoint is shown by `docker volume
    inspect`, logged and put on the FUSE process's command line. Messages never repeat the
    value (callers show it through redact_userinfo)."""
    if "@" in value:
        # Tested before anything else, so that no other message is tempted to show the value.
        raise ValueError(
            "an endpoint URL must not contain user information (user:password@ or user@): "
            "it would be shown by `docker volume inspect`, in logs and on command lines; "
            + credentials_hint
        )
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected a URL starting with http:// or https://")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("expected http(s)://host[:port][/path] with a numeric port") from None
    if not parts.hostname:
        raise ValueError("expected http(s)://host[:port][/path]: the host is missing")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        # A query could carry a signature or token, shown wherever the endpoint is.
        raise ValueError("an endpoint URL takes no query (?...) or fragment (#...)")
    return value


_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def check_bucket_name(value: str) -> str:
    """An S3 bucket name (3-63 letters, digits, '.', '-', '_'): the one check of every bucket
    in volume options and `s3://bucket/...` URLs. `user:password@bucket` is refused like
    user information in an endpoint, since options are shown by `docker volume inspect`."""
    if "@" in value or ":" in value:
        raise ValueError(
            "a bucket name cannot hold user information (user:password@); " + DAEMON_CREDENTIALS
        )
    if not _BUCKET_RE.match(value):
        raise ValueError(
            "expected an S3 bucket name: 3-63 letters, digits, '.', '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return value


def endpoint_arg(value: str) -> str:
    """argparse `type=` for the CLIs' --endpoint: check_url, reported as a usage error that
    shows the value with its user information masked."""
    try:
        return check_url(value, CLI_CREDENTIALS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"endpoint {redact_userinfo(value)!r}: {exc}") from None


def check_text(value: str) -> str:
    """Free text that ends up in arguments and logs: no NUL, no line breaks."""
    if "\0" in value or "\n" in value:
        raise ValueError("must not contain NUL or newline characters")
    return value


def split_backend(
    raw: Mapping[str, str] | None, known_backends: list[str]
) -> tuple[str, dict[str, str]]:
    """Normalise option keys and pull out `backend`; returns (backend kind, remaining options)."""
    options: dict[str, str] = {}
    for key, value in (raw or {}).items():
        norm = normalise_key(key)
        if not norm:
            raise InvalidOptionError("option names must not be empty")
        if norm in options:
            raise InvalidOptionError(f"option {key!r} is given twice")
        options[norm] = value
    backend = options.pop(BACKEND_OPTION, DEFAULT_BACKEND).strip().lower() or DEFAULT_BACKEND
    if backend not in known_backends:
        raise InvalidOptionError(
            f"unknown backend {backend!r}; valid backends: {', '.join(sorted(known_backends))}"
        )
    return backend, options


def check_options(
    backend: str, options: Mapping[str, str], specs: Mapping[str, OptionSpec]
) -> None:
    """Reject secrets, unknown options and malformed values, naming the option each time."""
    for key in options:  # secrets first: whatever else is wrong, say this
        if any(marker in key for marker in SECRET_MARKERS):
            raise InvalidOptionError(
                f"option {key!r} looks like a credential; credentials are never accepted as "
                "volume options because `docker volume inspect` shows options to anyone. "
                "Configure them on the stowage daemon (AWS environment, shared credentials "
                "file, or a named profile) and select one with -o profile=NAME"
            )
    for key, value in options.items():
        spec = specs.get(key)
        if spec is None:
            valid = ", ".join([BACKEND_OPTION, *sorted(specs)])
            raise InvalidOptionError(
                f"unknown option {key!r} for backend {backend!r}; valid options: {valid}"
            )
        try:
            spec.check(value)
        except ValueError as exc:
            shown = redact_userinfo(value)  # an endpoint's password must not reach the message
            raise InvalidOptionError(f"option {key}={shown!r}: {exc}") from None
