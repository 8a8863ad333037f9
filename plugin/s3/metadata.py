"""The s3fs-fuse object metadata codec, for every writer and reader in stowage.

s3fs-fuse keeps a file's attributes in user metadata: `x-amz-meta-mode` (decimal st_mode
including the file type), `-uid`, `-gid` and `-mtime`. It writes mtime as whole seconds, with
`.` and nine digits of nanoseconds only when there are any (s3fs-fuse `str(struct timespec)`
in src/string_util.cpp). `encode` writes exactly that, so an object written by the FUSE mount,
by stage-out or by s3fs-fuse itself carries the same metadata for the same file. Decoding
accepts any "seconds[.fraction]" (older stowage wrote "sec.000000000"; rclone writes
fractions of other lengths).

Read metadata is outside input: whoever wrote the bucket chose every value.
`sanitize` is the reading for local destinations (the copy engine writes real files from it):
metadata may describe an ordinary file, never grant privilege. Only a regular file or a
symlink can come out (a device, fifo or socket type becomes a regular file); permission bits
are clamped to 0o777 (no setuid, setgid or sticky); owners are numbers in the range the
kernel accepts. A value that is not what s3fs writes falls back to the default for that one
file and is reported, so one bad object never fails a copy. `decode` is the FUSE reading:
attributes of an inode, with defaults for anything missing or garbled.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

NS = 1_000_000_000
DEFAULT_FILE_MODE = stat.S_IFREG | 0o644
#: uid_t is 32 bits and (uid_t)-1 means "unchanged" to chown(2).
MAX_ID = 2**32 - 2
#: mtimes beyond +-2**63 ns (about 1678-2262) do not fit the kernel's nanosecond timestamps.
MAX_MTIME_NS = 2**63 - 1
#: The metadata keys of the codec (without `x-amz-meta-`; boto3 and the stores add it).
KEYS = ("mode", "uid", "gid", "mtime")


def format_mtime(mtime_ns: int) -> str:
    """mtime as s3fs-fuse writes it: "sec", or "sec.nnnnnnnnn" when there are nanoseconds."""
    sign = "-" if mtime_ns < 0 else ""
    sec, nsec = divmod(abs(mtime_ns), NS)
    return f"{sign}{sec}" if nsec == 0 else f"{sign}{sec}.{nsec:09d}"


def parse_mtime(text: str | None) -> int | None:
    """ "seconds[.fraction]" (s3fs, rclone, any stowage version) as nanoseconds; None if
    missing, garbled or out of range."""
    if not text:
        return None
    text = text.strip()
    if not text.isascii() or len(text) > 40 or "e" in text.lower():
        return None
    try:
        ns = int(Decimal(text) * NS)
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return ns if -MAX_MTIME_NS <= ns <= MAX_MTIME_NS else None


def encode(mode: int, uid: int, gid: int, mtime_ns: int) -> dict[str, str]:
    """The user metadata of a file with these attributes. A negative uid/gid means "not
    known" (a copy that keeps no owner): then neither is written."""
    meta = {"mode": str(mode)}
    if uid >= 0 and gid >= 0:
        meta["uid"] = str(uid)
        meta["gid"] = str(gid)
    meta["mtime"] = format_mtime(mtime_ns)
    return meta


def canonical(metadata: Mapping[str, str]) -> dict[str, str]:
    """*metadata* with an mtime any stowage version wrote rewritten as s3fs writes it (for
    writers that build the dict themselves); other keys as they are, lower-cased."""
    meta = {k.lower(): v for k, v in metadata.items()}
    ns = parse_mtime(meta.get("mtime"))
    if ns is not None:
        meta["mtime"] = format_mtime(ns)
    return meta


def _lowered(metadata: Mapping[str, str]) -> dict[str, str]:
    """Keys compared case-insensitively: some servers return `Mode`."""
    return {k.lower(): v for k, v in metadata.items()}


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    return int(text)


@dataclass(frozen=True)
class ObjectMeta:
    """The safe reading of an object's metadata for a local file."""

    mode: int = DEFAULT_FILE_MODE
    uid: int = -1
    gid: int = -1
    mtime_ns: int | None = None
    #: Keys whose values were not usable and fell back to the default.
    rejected: tuple[str, ...] = field(default=())


def sanitize(metadata: Mapping[str, str]) -> ObjectMeta:
    """The safe reading of an object's metadata for a local destination (see module doc)."""
    md = _lowered(metadata)
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
    if mtime_ns is not None and mtime_ns < 0:
        mtime_ns = None  # before 1970: not what a copy restores
    if md.get("mtime") and mtime_ns is None:
        rejected.append("mtime")
    return ObjectMeta(mode, uid, gid, mtime_ns, tuple(rejected))


@dataclass(frozen=True)
class Decoded:
    """Attributes of an object for the FUSE filesystem."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int


def decode(
    metadata: Mapping[str, str],
    *,
    default_mode: int,
    default_uid: int,
    default_gid: int,
    last_modified_ns: int,
) -> Decoded:
    """Attributes from *metadata*; anything missing or garbled gets its default. The type
    in *default_mode* (inferred from the key) is kept when the metadata names none, and a
    directory stays a directory."""
    meta = _lowered(metadata)

    def _int(name: str, default: int, high: int) -> int:
        value = _parse_int(meta[name]) if meta.get(name) else None
        return default if value is None or value > high else value

    mode = _int("mode", default_mode, 0o177777)
    if stat.S_IFMT(mode) == 0:
        # Some tools store only permission bits; keep the type we inferred from the key.
        mode |= stat.S_IFMT(default_mode)
    if stat.S_ISDIR(default_mode) and not stat.S_ISDIR(mode):
        mode = default_mode
    mtime_ns = parse_mtime(meta.get("mtime"))
    return Decoded(
        mode=mode,
        uid=_int("uid", default_uid, MAX_ID),
        gid=_int("gid", default_gid, MAX_ID),
        mtime_ns=mtime_ns if mtime_ns is not None else last_modified_ns,
    )
