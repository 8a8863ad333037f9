"""Domain errors of the S3 filesystem. Only `operations.py` turns them into `FUSEError`."""


class FsError(Exception):
    """Base class: an expected failure of a filesystem request."""


class NotFoundError(FsError):
    """No object, directory or inode by that name."""


class ExistsError(FsError):
    """The target name is already taken (mkdir, symlink, rename with RENAME_NOREPLACE)."""


class NotEmptyError(FsError):
    """rmdir, or rename onto a directory, that still has entries."""


class IsADirError(FsError):
    """A file operation on a directory."""


class NotADirError(FsError):
    """A directory operation on a file."""


class ReadOnlyError(FsError):
    """The filesystem was mounted with --readonly."""


class UnsupportedError(FsError):
    """An operation S3 cannot represent (hard links, device nodes, rename exchange)."""


class InvalidError(FsError):
    """A request that makes no sense (e.g. renaming a directory into itself)."""


class RemoteError(FsError):
    """S3 failed or was unreachable; the request may succeed later."""


class StaleError(RemoteError):
    """The object changed on the server while we had part of it cached."""


class UploadFailedError(RemoteError):
    """Dirty data could not be uploaded. It stays in the local cache and is retried."""
