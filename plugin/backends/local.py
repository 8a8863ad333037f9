"""Local-directory volumes: the default backend, no cloud and no setup.

A managed volume keeps its data in `<root>/volumes/<encoded name>/data` (deleted by Remove);
`path=` serves an existing host directory under an allowed root (never deleted). With
`readonly=true` Docker gets a read-only bind of the data at `<root>/mounts/<encoded name>`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugin.backends import mounts
from plugin.backends.base import Backend
from plugin.backends.credentials import CredentialsFile
from plugin.backends.staging import OPTION_SPECS as STAGING_OPTION_SPECS
from plugin.backends.staging import Stager
from plugin.errors import BackendError, InvalidOptionError, MountError
from plugin.names import encode_name
from plugin.options import OptionSpec, parse_bool, parse_id, parse_mode
from plugin.records import VolumeRecord

log = logging.getLogger(__name__)


def _check_abs_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected an absolute host path")
    if "\0" in value:
        raise ValueError("path must not contain NUL characters")
    return value


class LocalBackend(Backend):
    kind: ClassVar[str] = "local"
    option_specs: ClassVar[Mapping[str, OptionSpec]] = {
        spec.name: spec
        for spec in (
            OptionSpec(
                "path",
                "serve this existing host directory (under an --allowed-path); "
                "Remove never deletes it",
                _check_abs_path,
            ),
            OptionSpec("uid", "numeric owner applied to the volume root", parse_id),
            OptionSpec("gid", "numeric group applied to the volume root", parse_id),
            OptionSpec(
                "mode", "octal permissions applied to the volume root, e.g. 0770", parse_mode
            ),
            OptionSpec("readonly", "true: containers get a read-only bind of the data", parse_bool),
        )
    }
    #: Staging (stage_in, stage_out, ...) is a layer over managed local volumes: its own table.
    extra_option_specs: ClassVar[Mapping[str, OptionSpec]] = {
        spec.name: spec for spec in STAGING_OPTION_SPECS
    }

    def __init__(
        self,
        root: Path,
        allowed_paths: tuple[Path, ...] = (),
        mount_root: Path | None = None,
        credentials: CredentialsFile | None = None,
        s3_defaults: Mapping[str, str] | None = None,
    ) -> None:
        """`mount_root` set (a managed plugin's PropagatedMount): every volume is handed to
        Docker as a bind under it, since paths elsewhere are invisible to dockerd. Unset
        (legacy plugin): Docker gets the data directory itself, and read-only binds go to
        `<root>/mounts`."""
        super().__init__(root)
        self.allowed_paths = tuple(Path(os.path.realpath(p)) for p in allowed_paths)
        self.volumes_dir = root / "volumes"
        self.always_bind = mount_root is not None
        self.mounts_dir = mount_root if mount_root is not None else root / "mounts"
        self.trash_dir = root / "trash"
        self.stager = Stager(root, self._resolve_allowed, credentials)
        self.s3_defaults = dict(s3_defaults or {})

    # -- paths ---------------------------------------------------------------------------------

    def _volume_dir(self, record: VolumeRecord) -> Path:
        return self.volumes_dir / encode_name(record.name)

    def data_path(self, record: VolumeRecord) -> Path:
        """Where the volume's files live on the host."""
        if "path" in record.options:
            return Path(record.options["path"])
        return self._volume_dir(record) / "data"

    def _readonly(self, record: VolumeRecord) -> bool:
        return parse_bool(record.options.get("readonly", "false"))

    def mountpoint(self, record: VolumeRecord) -> Path:
        if self.always_bind or self._readonly(record):
            return self.mounts_dir / encode_name(record.name)
        return self.data_path(record)

    # -- lifecycle -----------------------------------------------------------------------------

    def _resolve_allowed(self, raw: str) -> Path:
        if not self.allowed_paths:
            raise InvalidOptionError(
                "path= volumes are disabled: start stowage with --allowed-path DIR "
                "(or STOWAGE_ALLOWED_PATHS) to allow serving host directories under DIR"
            )
        real = Path(os.path.realpath(raw))
        for allowed in self.allowed_paths:
            if real == allowed or allowed in real.parents:
                return real
        allowed_list = ", ".join(str(p) for p in self.allowed_paths)
        raise InvalidOptionError(
            f"path {raw!r} (resolved to {real}) is not under an allowed path ({allowed_list})"
        )

    def validate(self, name: str, options: Mapping[str, str]) -> None:
        if "path" in options:
            real = self._resolve_allowed(options["path"])
            if not real.is_dir():
                raise InvalidOptionError(f"path {options['path']!r} is not an existing directory")
        self.stager.validate(options)

    def with_defaults(self, options: Mapping[str, str]) -> dict[str, str]:
        """S3 defaults for staged volumes whose stage_in or stage_out is on S3."""
        if options.get("stage_in", "").startswith("s3://") or options.get("stage_out"):
            return {**self.s3_defaults, **options}
        return dict(options)

    def canonical_options(self, options: Mapping[str, str]) -> dict[str, str]:
        """Store path= resolved, so a symlink swapped later cannot redirect the volume."""
        result = dict(options)
        if "path" in result:
            result["path"] = str(self._resolve_allowed(result["path"]))
        stage_in = result.get("stage_in", "")
        if stage_in.startswith("/"):
            result["stage_in"] = str(self._resolve_allowed(stage_in))
        return result

    def create(self, record: VolumeRecord) -> None:
        if "path" in record.options:
            data = self.data_path(record)
        else:
            volume_dir = self._volume_dir(record)
            data = volume_dir / "data"
            try:
                volume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                if data.exists():
                    log.warning(
                        "reusing existing data directory %s for volume %s", data, record.name
                    )
                else:
                    data.mkdir(mode=0o755)
            except OSError as exc:
                raise BackendError(f"cannot create data directory {data}: {exc.strerror}") from exc
        self._apply_ownership(record, data)
        if "path" not in record.options:
            self.stager.created(record, data, self._volume_dir(record))

    def _apply_ownership(self, record: VolumeRecord, data: Path) -> None:
        opts = record.options
        try:
            if "uid" in opts or "gid" in opts:
                uid = parse_id(opts["uid"]) if "uid" in opts else -1
                gid = parse_id(opts["gid"]) if "gid" in opts else -1
                os.chown(data, uid, gid)
            if "mode" in opts:
                os.chmod(data, parse_mode(opts["mode"]))
            elif "path" not in opts:
                os.chmod(data, 0o755)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise BackendError(f"cannot set owner/mode of {data}: {exc.strerror}") from exc

    def mount(self, record: VolumeRecord) -> Path:
        data = self.data_path(record)
        if not data.is_dir():
            if "path" in record.options:
                raise MountError(
                    f"host directory {data} of volume {record.name!r} no longer exists; "
                    "recreate it, or remove the volume"
                )
            raise MountError(
                f"data directory {data} of volume {record.name!r} is missing; was stowage's "
                "root moved or cleaned? Remove and recreate the volume to start empty"
            )
        staged = "path" not in record.options and self.stager.mount(
            record, data, self._volume_dir(record)
        )
        if staged:
            self._apply_ownership(record, data)  # the copy may have set the source's
        target = self.mountpoint(record)
        if target == data:
            return target
        try:
            target.mkdir(parents=True, exist_ok=True)
            if not mounts.is_mountpoint(target):
                mounts.bind_mount(data, target, readonly=self._readonly(record))
        except OSError as exc:
            raise MountError(f"cannot bind {data} at {target}: {exc}") from exc
        return target

    def unmount(self, record: VolumeRecord) -> None:
        self._unbind(record)
        self.stager.unmount(record)

    def _unbind(self, record: VolumeRecord) -> None:
        target = self.mountpoint(record)
        if target == self.data_path(record):
            return
        try:
            mounts.lazy_unmount(target)
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"cannot unmount {target}: {exc}") from exc

    def remove(self, record: VolumeRecord) -> None:
        if "path" in record.options:
            self._unbind(record)
            return  # the host directory belongs to the user
        self.stager.remove(record, self.data_path(record), self._volume_dir(record))
        self._unbind(record)
        volume_dir = self._volume_dir(record)
        if not volume_dir.exists():
            return
        # Rename first: the volume is gone from its path atomically; deletion may take long.
        self.trash_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        trashed = self.trash_dir / f"{encode_name(record.name)}.{uuid.uuid4().hex}"
        try:
            volume_dir.rename(trashed)
        except OSError as exc:
            raise BackendError(
                f"cannot remove data directory {volume_dir}: {exc.strerror}"
            ) from exc
        self._delete_tree(trashed)

    def _delete_tree(self, path: Path) -> None:
        def onerror(_func: object, failed: str, exc_info: object) -> None:
            log.warning("cannot delete %s: %s (left in %s)", failed, exc_info, self.trash_dir)

        # `onerror` is deprecated from 3.12 on in favour of `onexc`, which 3.11 lacks.
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=onerror)
        else:
            shutil.rmtree(path, onerror=onerror)

    def status(self, record: VolumeRecord) -> dict[str, Any]:
        status: dict[str, Any] = {"data": str(self.data_path(record))}
        if "path" not in record.options:
            status.update(
                self.stager.status(record, self.data_path(record), self._volume_dir(record))
            )
        return status

    def recover(self, record: VolumeRecord, mounted: bool) -> None:
        if "path" not in record.options:
            self.stager.recover(record, self.data_path(record), self._volume_dir(record), mounted)
        if self.mountpoint(record) == self.data_path(record):
            return
        if mounted:
            self.mount(record)
        else:
            self.unmount(record)

    def housekeeping(self) -> None:
        if self.trash_dir.exists():
            for leftover in self.trash_dir.iterdir():
                log.info("deleting leftover of an interrupted Remove: %s", leftover)
                self._delete_tree(leftover)
