"""`stowage volume backup NAME DEST` and `stowage volume restore SRC NAME`: a local volume's
data to or from a local path or an S3 prefix, with the copy core.

Why here and not only `stowage cp`: the user names a volume, not its data directory (names are
percent-encoded, `path=` volumes live elsewhere). A DEST/SRC ending in `.tar.gz` is an archive
with `./` members, the layout of the classic `tar czf backup.tar.gz -C /data .` recipe, so
either can restore the other's backups; anything else is a tree, copied incrementally.
Archives are read and written by `plugin.driver.archive`, whose member policy makes a hostile
archive harmless to the host whatever the Python version.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from plugin.backends.local import data_path_of
from plugin.driver.archive import ArchiveError, ArchiveResult, extract_archive, write_archive
from plugin.errors import PluginError
from plugin.names import validate_name
from plugin.staging.engine import CopyOptions, S3Options, copy
from plugin.staging.locations import LocalLocation
from plugin.staging.progress import CopyResult

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


class BackupError(PluginError):
    """The backup or restore cannot run; the message says why and what to do."""


def is_archive(location: str) -> bool:
    return location.lower().endswith(ARCHIVE_SUFFIXES)


def volume_data_dir(root: Path, name: str, *, for_restore: bool = False) -> Path:
    """The data directory of local volume *name*, read from the daemon's state database."""
    from plugin.driver.state import StateStore

    name = validate_name(name)
    db = root / "state.db"
    if not db.exists():
        raise BackupError(f"no stowage state at {db}: pass --root (or set STOWAGE_ROOT)")
    store = StateStore(db)
    try:
        loaded = store.load()
    finally:
        store.close()
    record = loaded.volumes.get(name)
    if record is None or record.removing:
        raise BackupError(
            f"volume {name!r} not found in {db}"
            + ("; create it first with `docker volume create -d stowage`" if for_restore else "")
        )
    if record.backend != "local":
        raise BackupError(
            f"volume {name!r} is an {record.backend} volume: its data already lives in S3; "
            "copy it with `stowage cp s3://bucket/prefix DEST`"
        )
    if for_restore and loaded.mounts.get(name):
        raise BackupError(
            f"volume {name!r} is in use by a container; stop it first (restoring under a "
            "running application corrupts its view of the data)"
        )
    # The local backend knows where a volume's files are. The root and a path= value (the
    # admin's; resolved at Create) are resolved now, nothing beneath them: the data directory
    # is then opened with no symlink followed, so one swapped in since is refused.
    data = data_path_of(Path(os.path.realpath(root)), record)
    return Path(os.path.realpath(data)) if "path" in record.options else data


def _volume_location(data: Path) -> LocalLocation:
    """A volume's data directory as a copy location, opened with no symlink followed."""
    return LocalLocation(str(data), trailing_slash=True, no_symlinks=True)


def backup(
    data: Path, dest: str, options: CopyOptions, s3: S3Options
) -> CopyResult | ArchiveResult:
    """Tree copy, or a .tar.gz written atomically; the result says what was copied/skipped."""
    if not is_archive(dest):
        return copy(_volume_location(data), dest.rstrip("/") + "/", options, s3=s3)
    try:
        if not dest.lower().startswith("s3://"):
            return write_archive(data, dest, no_symlinks=True)
        with tempfile.TemporaryDirectory(prefix="stowage-backup-") as tmp:
            archive = Path(tmp) / "backup.tar.gz"
            written = write_archive(data, archive, no_symlinks=True)
            result = copy(str(archive), dest, options, s3=s3)
            if not result.ok:
                raise BackupError(f"uploading the archive to {dest} failed: {result.summary()}")
            return written
    except ArchiveError as exc:
        raise BackupError(str(exc)) from exc


def restore(
    src: str, data: Path, options: CopyOptions, s3: S3Options
) -> CopyResult | ArchiveResult:
    """Tree copy into the volume (incremental), or extraction of a .tar.gz, which overwrites
    what is there like `tar xzf ARCHIVE -C /data`; a hostile archive is refused whole."""
    if not is_archive(src):
        return copy(src.rstrip("/") + "/", _volume_location(data), options, s3=s3)
    with tempfile.TemporaryDirectory(prefix="stowage-restore-") as tmp:
        archive = Path(src)
        if src.lower().startswith("s3://"):
            archive = Path(tmp) / "backup.tar.gz"
            result = copy(src, str(archive), options, s3=s3)
            if not result.ok:
                raise BackupError(f"downloading {src} failed: {result.summary()}")
        if not archive.is_file():
            raise BackupError(f"archive {src} does not exist")
        try:
            return extract_archive(archive, data, no_symlinks=True)
        except ArchiveError as exc:
            raise BackupError(str(exc)) from exc
