"""s3fs-style object metadata (`x-amz-meta-mode`, `-uid`, `-gid`, `-mtime`) read for local
destinations, where it is outside input: whoever wrote the bucket chose every value.

The rule: metadata may describe an ordinary file, never grant privilege. Only a regular file
or a symlink can come out (a device, fifo or socket type becomes a regular file); permission
bits are clamped to 0o777 (no setuid, setgid or sticky); owners are numbers in the range the
kernel accepts. A value that is not what s3fs writes falls back to the default for that one
file and is reported, so one bad object never fails a copy.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

DEFAULT_FILE_MODE = stat.S_IFREG | 0o644
#: uid_t is 32 bits and (uid_t)-1 means "unchanged" to chown(2).
MAX_ID = 2**32 - 2
#: mtimes outside [1970, 2262) do not fit the kernel's nanosecond timestamps.
MAX_MTIME_NS = 2**63 - 1


def parse_mtime(text: str | None) -> int | None:
    """Seconds (with an optional fraction, as s3fs or stowage wrote them) as nanoseconds."""
    if not text:
        return None
    try:
        ns = int(Decimal(text.strip()) * 1_000_000_000)
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return ns if 0 <= ns <= MAX_MTIME_NS else None


@dataclass(frozen=True)
class ObjectMeta:
    mode: int = DEFAULT_FILE_MODE
    uid: int = -1
    gid: int = -1
    mtime_ns: int | None = None
    #: Keys whose values were not usable and fell back to the default.
    rejected: tuple[str, ...] = field(default=())


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    return int(text)


def sanitize_object_meta(metadata: Mapping[str, str]) -> ObjectMeta:
    """The safe reading of an object's metadata (keys compared case-insensitively: some
    servers return `Mode`)."""
    md = {k.lower(): v for k, v in metadata.items()}
    rejected: list[str] = []
    mode = DEFAULT_FILE_MODE
    if md.get("mode"):
        raw = _parse_int(md["mode"])
        if raw is None or raw > 0o177777:
            rejected.append("mode")
        elif stat.S_IFMT(raw) == stat.S_IFLNK:
            mode = stat.S_IFLNK | 0o777
        elif stat.S_IFMT(raw) in (0, stat.S_IFREG):
            mode = stat.S_IFREG | (raw & 0o777)
            if raw & 0o7000:
                rejected.append("mode")  # reported: setuid/setgid/sticky dropped
        else:  # a device, fifo, socket or directory type for an object with a body
            rejected.append("mode")
            mode = stat.S_IFREG | (raw & 0o777)
    ids = []
    for key in ("uid", "gid"):
        value = _parse_int(md[key]) if md.get(key) else -1
        if value is None or value > MAX_ID:
            rejected.append(key)
            value = -1
        ids.append(value)
    uid, gid = ids
    if (uid < 0) != (gid < 0):
        uid = gid = -1
    mtime_ns = parse_mtime(md.get("mtime"))
    if md.get("mtime") and mtime_ns is None:
        rejected.append("mtime")
    return ObjectMeta(mode, uid, gid, mtime_ns, tuple(rejected))
