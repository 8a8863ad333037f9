"""`stowage volume backup NAME DEST` and `stowage volume restore SRC NAME`: a local volume's
data to or from a local path or an S3 prefix, with the copy core.

Why here and not only `stowage cp`: the user names a volume, not its data directory (names are
percent-encoded, `path=` volumes live elsewhere). A DEST/SRC ending in `.tar.gz` is an archive
with `./` members, the layout of the classic `tar czf backup.tar.gz -C /data .` recipe, so
either can restore the other's backups; anything else is a tree, copied incrementally.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

from plugin.errors import PluginError
from plugin.names import encode_name, validate_name
from plugin.staging.engine import CopyOptions, S3Options, copy
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
    if "path" in record.options:
        return Path(record.options["path"])
    return root / "volumes" / encode_name(name) / "data"


def backup(data: Path, dest: str, options: CopyOptions, s3: S3Options) -> CopyResult | None:
    """Tree copy (returns the copy result), or a .tar.gz written atomically (returns None)."""
    if not is_archive(dest):
        return copy(str(data) + "/", dest.rstrip("/") + "/", options, s3=s3)
    if dest.lower().startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="stowage-backup-") as tmp:
            archive = Path(tmp) / "backup.tar.gz"
            _write_archive(data, archive)
            result = copy(str(archive), dest, options, s3=s3)
            if not result.ok:
                raise BackupError(f"uploading the archive to {dest} failed: {result.summary()}")
        return None
    final = Path(dest).absolute()
    partial = final.with_name(f".{final.name}.partial")
    _write_archive(data, partial)
    os.replace(partial, final)
    return None


def _write_archive(data: Path, archive: Path) -> None:
    try:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(str(data), arcname=".")
    except OSError as exc:
        archive.unlink(missing_ok=True)
        raise BackupError(f"cannot write {archive}: {exc}") from exc


def restore(src: str, data: Path, options: CopyOptions, s3: S3Options) -> CopyResult | None:
    """Tree copy into the volume (incremental), or extraction of a .tar.gz."""
    if not is_archive(src):
        return copy(src.rstrip("/") + "/", str(data) + "/", options, s3=s3)
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
            with tarfile.open(archive, "r:*") as tar:
                # "tar" filter: no absolute paths, nothing outside the volume, no setuid bits;
                # like `tar xzf ARCHIVE -C /data`, existing files are overwritten.
                tar.extractall(data, filter="tar")
        except (OSError, tarfile.TarError) as exc:
            raise BackupError(f"cannot extract {src} into {data}: {exc}") from exc
    return None
