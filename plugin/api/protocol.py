"""The Docker volume plugin wire format: endpoint paths, request parsing, response shapes.

This is the only module that knows Docker's PascalCase JSON keys. Parsing is lenient in the ways
dockerd needs (no Content-Type, empty Activate body, `Opts: null`) and strict about types, so a
malformed request gets an error that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from plugin.errors import InvalidRequestError

CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"

ACTIVATE = "/Plugin.Activate"
CREATE = "/VolumeDriver.Create"
REMOVE = "/VolumeDriver.Remove"
MOUNT = "/VolumeDriver.Mount"
UNMOUNT = "/VolumeDriver.Unmount"
PATH = "/VolumeDriver.Path"
GET = "/VolumeDriver.Get"
LIST = "/VolumeDriver.List"
CAPABILITIES = "/VolumeDriver.Capabilities"

ENDPOINTS = (ACTIVATE, CREATE, REMOVE, MOUNT, UNMOUNT, PATH, GET, LIST, CAPABILITIES)
#: Answered from the driver's in-memory state, never waiting for a lock a slow operation
#: holds: the server runs them apart from the others, so they answer at once under any load.
QUICK_ENDPOINTS = frozenset((ACTIVATE, PATH, GET, LIST, CAPABILITIES))


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body; empty and `null` bodies mean `{}`, as dockerd sends them."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        # json's decoder recurses per nesting level; dockerd's bodies are two levels deep.
        raise InvalidRequestError(
            "request body is nested too deeply (Docker's requests are flat JSON objects)"
        ) from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(body: dict[str, Any], key: str) -> Any:
    """Go's decoder matches keys case-insensitively; do the same for robustness."""
    if key in body:
        return body[key]
    lowered = key.lower()
    for candidate, value in body.items():
        if isinstance(candidate, str) and candidate.lower() == lowered:
            return value
    return None


def _string(body: dict[str, Any], key: str) -> str:
    value = _field(body, key)
    if value is None:
        raise InvalidRequestError(f"request is missing the {key!r} field")
    if not isinstance(value, str):
        raise InvalidRequestError(f"field {key!r} must be a string, got {type(value).__name__}")
    return _unicode(value, f"field {key!r}")


def _unicode(value: str, what: str) -> str:
    """JSON's \\uD800-style escapes can produce a lone UTF-16 surrogate, which is not text:
    it cannot be encoded to UTF-8 (a path, the state database, a log line). Refuse it here,
    naming it, rather than fail somewhere deeper with an internal error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what} contains a lone UTF-16 surrogate ({value[exc.start]!r} at character "
            f"{exc.start}), which is not valid Unicode; send UTF-8 text"
        ) from None
    return value


@dataclass(frozen=True)
class NameRequest:
    name: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> NameRequest:
        return cls(_string(body, "Name"))


@dataclass(frozen=True)
class CreateRequest:
    name: str
    opts: dict[str, str]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> CreateRequest:
        opts = _field(body, "Opts")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise InvalidRequestError("field 'Opts' must be a JSON object of strings")
        for key, value in opts.items():
            if not isinstance(value, str):
                raise InvalidRequestError(f"option {key!r} must have a string value")
            _unicode(key, "an option name")
            _unicode(value, f"option {key!r}")
        return cls(_string(body, "Name"), opts)


@dataclass(frozen=True)
class MountRequest:
    name: str
    mount_id: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> MountRequest:
        return cls(_string(body, "Name"), _string(body, "ID"))


def error(message: str) -> dict[str, Any]:
    return {"Err": message}


def ok() -> dict[str, Any]:
    return {"Err": ""}


def volume_json(
    name: str, mountpoint: str, created_at: str | None = None, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    volume: dict[str, Any] = {"Name": name, "Mountpoint": mountpoint}
    if created_at:  # an empty CreatedAt makes dockerd drop the volume (protocol.md §1.3)
        volume["CreatedAt"] = created_at
    if status is not None:
        volume["Status"] = status
    return volume
