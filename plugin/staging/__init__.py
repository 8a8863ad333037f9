"""The chunked copy core: copies a file or a tree between a local path and an S3 prefix (either
direction) or between local paths; resumable, verified, bounded in memory. No Flask or Docker
here: the driver calls `copy()` when staging a volume, and `stowage cp` exposes it directly.
"""

from plugin.s3.store import ObjectStore
from plugin.staging.engine import DEFAULT_CHUNK_SIZE, CopyOptions, S3Options, copy
from plugin.staging.errors import (
    CopyCancelledError,
    InvalidLocationError,
    SourceNotFoundError,
    StagingError,
    TransferError,
    VerificationError,
)
from plugin.staging.progress import CopyResult, FileError, Progress

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CopyCancelledError",
    "CopyOptions",
    "CopyResult",
    "FileError",
    "InvalidLocationError",
    "ObjectStore",
    "Progress",
    "S3Options",
    "SourceNotFoundError",
    "StagingError",
    "TransferError",
    "VerificationError",
    "copy",
]
