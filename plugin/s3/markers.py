"""Does the server keep `dir/` marker objects? The `dir_markers` option and its probe.

S3, MinIO, Ceph and moto keep an empty `x/` object as a directory marker; `rclone serve s3`
on a directory stores it as a 0-byte *file* `x`, after which nothing can be written below
`x/`. Both the FUSE filesystem and the copy engine need to know which one they talk to.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

from plugin.s3.client import S3Settings, make_s3_client
from plugin.s3.errors import error_code, is_temp_failure

log = logging.getLogger(__name__)


#: Name of the probe object `dir_markers_supported` writes (and deletes) below a prefix.
PROBE_NAME = ".stowage-probe-"
#: Codes that say the probe was not allowed to write: the answer stays unknown.
DENIED_CODES = frozenset({"403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId"})


def parse_dir_markers(value: str) -> bool | None:
    """The `dir_markers` option: `auto` (None: ask the server), or true/false."""
    if value.strip().lower() == "auto":
        return None
    from plugin.options import parse_bool

    return parse_bool(value)


def check_dir_markers(value: str) -> str:
    """Option validator: auto, true or false."""
    parse_dir_markers(value)
    return value


class ProbeError(Exception):
    """The probe could not tell (server unreachable, writes denied): ask again later."""


def dir_markers_supported(client: Any, bucket: str, prefix: str = "") -> bool:
    """Whether the server keeps an empty `x/` object as a directory marker.

    S3, MinIO, Ceph and moto do; `rclone serve s3` on a directory stores the PUT of `x/` as a
    0-byte *file* `x`, after which nothing can be written below `x/`. The probe PUTs a
    uniquely named `<prefix>/.stowage-probe-<random>/`, LISTs that name without the slash,
    and deletes what it made: True if the listing holds the key with its slash, False if the
    server refused such a key or turned it into something else. Costs three or four requests.
    Raises ProbeError when it cannot tell (transient failure, writes denied).
    """
    base = prefix.strip("/")
    name = f"{base}/" if base else ""
    name += PROBE_NAME + secrets.token_hex(8)
    marker = name + "/"
    try:
        client.put_object(
            Bucket=bucket, Key=marker, Body=b"", ContentType="application/x-directory"
        )
    except Exception as exc:
        code = error_code(exc)
        if code is None:
            raise ProbeError(f"PUT {marker}: {exc}") from exc
        if is_temp_failure(exc) or code in DENIED_CODES or code in ("404", "NoSuchBucket"):
            raise ProbeError(f"PUT {marker}: {exc}") from exc
        log.info("s3://%s refuses 'dir/' marker keys (%s): no directory markers", bucket, code)
        return False
    keys: set[str] = set()
    try:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=name, MaxKeys=10)
        keys = {str(o["Key"]) for o in listing.get("Contents", [])}
    except Exception as exc:
        raise ProbeError(f"LIST {name}: {exc}") from exc
    finally:
        for key in sorted(keys | {marker}, reverse=True):
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=key)
    supported = marker in keys
    log.info(
        "s3://%s %s 'dir/' markers (probe kept %s)",
        bucket,
        "keeps" if supported else "cannot keep",
        sorted(keys) or "nothing",
    )
    return supported


def resolve_dir_markers(value: bool | None, settings: S3Settings, bucket: str, prefix: str) -> bool:
    """`dir_markers` for a copy to `s3://bucket/prefix`: an explicit value as it is; `auto`
    (None) asked of the server, or True (what S3 does) when the probe cannot tell. Blocking."""
    if value is not None:
        return value
    try:
        return dir_markers_supported(make_s3_client(settings), bucket, prefix)
    except ProbeError as exc:
        log.warning(
            "cannot tell whether s3://%s keeps 'dir/' markers (%s); using them", bucket, exc
        )
        return True
