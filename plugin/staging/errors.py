"""Errors of the copy core. Messages are shown verbatim by `stowage cp` and, later, by
`docker volume inspect`, so each says what failed and what the user can do about it."""

from __future__ import annotations

from plugin.errors import PluginError


class StagingError(PluginError):
    """Base class for copy failures."""


class InvalidLocationError(StagingError):
    """A source or destination that is neither a usable local path nor `s3://bucket/prefix`."""


class SourceNotFoundError(StagingError):
    """The source path or S3 prefix does not exist or is empty."""


class TransferError(StagingError):
    """A request failed and retrying did not help (endpoint down, access denied, ...)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        #: True when the endpoint itself is unreachable: going on with other files is pointless.
        self.fatal = fatal


class VerificationError(StagingError):
    """The copied bytes do not match the source's size or checksum; the file was not renamed."""


class CopyCancelledError(StagingError):
    """The copy was cancelled; finished chunks are kept and a rerun resumes from them."""

    def __init__(self) -> None:
        super().__init__("copy cancelled; run it again to resume where it stopped")
