"""What a caller can ask of one copy (`CopyOptions`) and how S3 is reached (`S3Options`).

Kept apart from the engine's parts so every part can read the options without importing the
entry module that assembles them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from plugin.staging.objcache import ObjectCache
from plugin.staging.progress import ProgressCallback

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 8 * MiB


@dataclass(frozen=True)
class CopyOptions:
    """Knobs of one copy. Defaults suit a 2-core machine next to a loopback or LAN S3."""

    #: Worker threads (files and chunks in flight).
    jobs: int = 8
    #: Size of download chunks and upload parts; larger files are copied chunk by chunk.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Bytes per second over all workers; None = unlimited.
    bwlimit: float | None = None
    #: Attempts after the first for a request failing with a transient error.
    retries: int = 5
    #: First retry delay in seconds, doubled per attempt (with jitter), capped at 10 s.
    retry_delay: float = 0.25
    #: Check MD5/ETag as well as size (size is always checked).
    verify: bool = True
    #: Skip files whose destination already matches (size + mtime, or size + ETag).
    skip_unchanged: bool = True
    #: Owners recorded in the source. None (default): a local source's real owners when
    #: running as root (like `cp -a`), but never the uid/gid metadata of S3 objects, which
    #: whoever wrote the bucket chose; True: those too; False: never.
    preserve_owner: bool | None = None
    #: (uid, gid) given to every file and directory written locally (a staged volume's
    #: uid=/gid= options), instead of any owner from the source; -1 keeps that id.
    owner: tuple[int, int] | None = None
    #: One syncfs() of the destination at the end, instead of an fsync per file.
    fsync: bool = False
    #: Store empty directories in S3 as `dir/` marker objects (s3fs / console convention).
    dir_markers: bool = True
    #: Mirror: after a copy with no failure and a complete source listing, delete what the
    #: destination holds that the source does not (objects under the prefix; local files,
    #: links and directories). The engine's own `.stowage.*` files are kept.
    delete_extraneous: bool = False
    #: A host-wide cache of verified downloads: S3 objects bound for a local tree are
    #: filled from it when it has them, and verified downloads are admitted to it.
    object_cache: ObjectCache | None = None
    progress: ProgressCallback | None = None
    progress_interval: float = 0.5
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Byte path: "crt" (awscrt, fast), "boto3" (portable), "auto" (crt when installed).
    client: str = "auto"
