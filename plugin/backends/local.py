"""Local-directory volumes: the default backend, no cloud and no setup.

A managed volume keeps its data in `<root>/volumes/<encoded name>/data` (deleted by Remove);
`path=` serves an existing host directory under an allowed root (never deleted). With
`readonly=true` Docker gets a read-only bind of the data at `<root>/mounts/<encoded name>`.

A `path=` directory lies in a tree that other users (and containers it was served to) can
write, so anyone there may replace it, or a directory above it, with a symlink after Create.
Its path is therefore never handed to Docker nor given to mount(2) as a string: at every Mount
it is opened beneath the allowed root that holds it with nothing beneath that root followed
(`Tree.beneath`), and Docker gets a bind made from that descriptor at
`<root>/mounts/<encoded name>` (or under the managed plugin's mount root). Read-only binds of
managed volumes are made the same way.

Remove renames the volume directory into `<root>/trash` before deleting it, and an interrupted
Create leaves a directory the next start deletes: both in plugin/backends/volumedirs.py.

Size-limited volumes (`size=`): the data directory is the mount point of an ext4 image beside
it, `<root>/volumes/<encoded name>/image` (plugin/backends/quota.py). Create formats and mounts
it, Mount and recovery mount it again where it is missing (before Docker binds the directory),
and Remove unmounts and detaches it before the directory is deleted.

Staged volumes (`stage_in=`, `stage_out=`) are managed volumes with the hooks of
plugin/backends/staged/ called at Create, Mount, Unmount, Remove, Status and recovery.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugin.backends import mounts, quota, staged
from plugin.backends.base import Backend
from plugin.backends.credentials import CredentialsFile
from plugin.backends.staged.jobs import DEFAULT_JOBS
from plugin.backends.volumedirs import VolumeDirs
from plugin.confined import Tree, UnsafePathError
from plugin.errors import BackendError, InvalidOptionError, MountError, PluginError
from plugin.names import encode_name
from plugin.options import OptionSpec, parse_bool, parse_id, parse_mode
from plugin.records import VolumeRecord
from plugin.staging.objcache import ObjectCache

log = logging.getLogger(__name__)


#: Where managed volumes live under the daemon's root: `<root>/volumes/<encoded name>/data`.
VOLUMES_DIR = "volumes"


def volume_dir_of(root: Path, name: str) -> Path:
    """The directory of managed volume *name* under the daemon's *root*: its data and, for a
    size-limited volume, its image."""
    return root / VOLUMES_DIR / encode_name(name)


def data_path_of(root: Path, record: VolumeRecord) -> Path:
    """Where the files of local volume *record* live on the host, for the daemon and for tools
    that run without it (`stowage volume backup`): the one place that knows the layout."""
    if "path" in record.options:
        return Path(record.options["path"])
    return volume_dir_of(root, record.name) / "data"


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
            OptionSpec(
                "size",
                "cap the volume's data, e.g. 10G: writes past it fail with ENOSPC (a loop-mounted "
                "ext4 image; grow it with `stowage volume resize`)",
                quota.parse_volume_size,
            ),
        )
    }
    #: Staging (stage_in, stage_out, ...) is a layer over managed local volumes: its own table.
    extra_option_specs: ClassVar[Mapping[str, OptionSpec]] = {
        spec.name: spec for spec in staged.OPTION_SPECS
    }

    def __init__(
        self,
        root: Path,
        allowed_paths: tuple[Path, ...] = (),
        mount_root: Path | None = None,
        credentials: CredentialsFile | None = None,
        s3_defaults: Mapping[str, str] | None = None,
        staging_jobs: int = DEFAULT_JOBS,
        stage_cache: ObjectCache | None = None,
    ) -> None:
        """`mount_root` set (a managed plugin's PropagatedMount): every volume is handed to
        Docker as a bind under it, since paths elsewhere are invisible to dockerd. Unset
        (legacy plugin): Docker gets a managed volume's data directory itself, and binds
        (`path=` volumes, read-only volumes) go to `<root>/mounts`. `staging_jobs`: parallel
        file copies of each stage-in or stage-out; `stage_cache`: the host-wide cache of
        objects staged in (`--stage-cache`)."""
        super().__init__(root)
        self.allowed_paths = tuple(Path(os.path.realpath(p)) for p in allowed_paths)
        self.volumes_dir = root / VOLUMES_DIR
        self.always_bind = mount_root is not None
        self.mounts_dir = mount_root if mount_root is not None else root / "mounts"
        self.trash_dir = root / "trash"
        self.dirs = VolumeDirs(self.volumes_dir, self.trash_dir)
        self.stager = staged.Stager(
            root,
            self._resolve_allowed,
            credentials,
            room=self._room,
            jobs=staging_jobs,
            object_cache=stage_cache,
        )
        self.s3_defaults = dict(s3_defaults or {})

    # -- paths ---------------------------------------------------------------------------------

    def _volume_dir(self, record: VolumeRecord) -> Path:
        return volume_dir_of(self.root, record.name)

    def data_path(self, record: VolumeRecord) -> Path:
        """Where the volume's files live on the host."""
        return data_path_of(self.root, record)

    def _image(self, record: VolumeRecord) -> quota.LoopImage | None:
        """The loop image of a size-limited (`size=`) volume; None for other volumes."""
        if "size" not in record.options or "path" in record.options:
            return None
        return quota.LoopImage(self._volume_dir(record))

    def _mount_image(self, record: VolumeRecord, error: type[PluginError]) -> None:
        """Mount a size-limited volume's image on its data directory unless it is there."""
        image = self._image(record)
        if image is None:
            return
        try:
            if image.mount():
                log.info("mounted the image of size-limited volume %s", record.name)
        except (quota.SizeLimitError, OSError) as exc:
            raise error(f"cannot mount the image of volume {record.name!r}: {exc}") from None

    def _room(self, name: str) -> tuple[int, int] | None:
        """For staging: (bytes available, bytes used) in a size-limited volume, else None."""
        image = quota.LoopImage(volume_dir_of(self.root, name))
        if not image.exists():
            return None
        usage = image.usage()
        if usage.available is None or usage.used is None:
            return None
        return usage.available, usage.used

    def _readonly(self, record: VolumeRecord) -> bool:
        return parse_bool(record.options.get("readonly", "false"))

    def _binds(self, record: VolumeRecord) -> bool:
        """True if Docker gets a bind at mountpoint(record) rather than the data directory:
        always for `path=` volumes, whose path someone else may redirect with a symlink."""
        return self.always_bind or "path" in record.options or self._readonly(record)

    def mountpoint(self, record: VolumeRecord) -> Path:
        if self._binds(record):
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

    def _allowed_root_of(self, path: Path) -> tuple[Path, str] | None:
        """(allowed root, path relative to it) for the outermost allowed root holding *path*,
        so that as much of the path as possible is opened without following anything."""
        for allowed in sorted(self.allowed_paths, key=lambda p: len(p.parts)):
            if path == allowed or allowed in path.parents:
                return allowed, path.relative_to(allowed).as_posix()
        return None

    def _open_host_dir(self, path: Path) -> Tree:
        """The stored (resolved) `path=` directory, opened beneath its allowed root with no
        symlink beneath that root followed. Raises _HostDirError saying what is wrong."""
        found = self._allowed_root_of(path)
        if found is None:
            allowed_list = ", ".join(str(p) for p in self.allowed_paths) or "none"
            raise _HostDirError(f"is not under an allowed path any more (allowed: {allowed_list})")
        base, rel = found
        try:
            return Tree.beneath(base, rel)
        except UnsafePathError:
            raise _HostDirError(_swapped(base)) from None
        except FileNotFoundError:
            raise _HostDirError("no longer exists", missing=True) from None
        except NotADirectoryError:
            # openat2 reports a symlink in the last place as ENOTDIR: say which it is.
            if _is_link(base, rel):
                raise _HostDirError(_swapped(base)) from None
            raise _HostDirError(
                "is not a directory (or a directory on its way was replaced by a file)",
                missing=True,
            ) from None
        except OSError as exc:
            raise _HostDirError(f"cannot be opened: {exc.strerror}") from None

    def validate(self, name: str, options: Mapping[str, str]) -> None:
        if "size" in options:
            if "path" in options:
                raise InvalidOptionError(
                    "size= applies to managed volumes only, not to path= host directories"
                )
            reason = quota.unsupported_reason()
            if reason:
                raise InvalidOptionError(f"option size={options['size']!r}: {reason}")
        if "path" in options:
            raw = options["path"]
            real = self._resolve_allowed(raw)
            try:
                self._open_host_dir(real).close()
            except _HostDirError as exc:
                if exc.missing:
                    raise InvalidOptionError(f"path {raw!r} is not an existing directory") from None
                raise InvalidOptionError(f"path {raw!r} (resolved to {real}) {exc}") from None
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
            path = self.data_path(record)
            try:
                tree = self._open_host_dir(path)
            except _HostDirError as exc:
                raise InvalidOptionError(f"path {str(path)!r} {exc}") from None
            with tree:  # owner and mode go to the directory validated, through its descriptor
                self._apply_ownership(record, tree)
            return
        volume_dir = self._volume_dir(record)
        data = self.data_path(record)
        # The driver calls create only for a name it has no record of, so a directory there
        # was not made for this record: never reuse it (it would hand old files to a new volume).
        if not self.discard_leftover(record.name):
            raise BackendError(
                f"cannot create volume {record.name!r}: {data} already holds files of a volume "
                "stowage has no record of (was its state database replaced or deleted?); move "
                f"{volume_dir} elsewhere to keep them, or delete it, then create the volume again"
            )
        try:
            volume_dir.mkdir(mode=0o700, parents=True)
            data.mkdir(mode=0o755)
        except OSError as exc:
            raise BackendError(f"cannot create data directory {data}: {exc.strerror}") from exc
        image = self._image(record)
        if image is not None:
            self._create_image(record, image)
        with self._open_managed(record, BackendError) as tree:
            self._apply_ownership(record, tree)
        self.stager.created(record, data, self._volume_dir(record))

    def _create_image(self, record: VolumeRecord, image: quota.LoopImage) -> None:
        """Format and mount the image of a new size-limited volume. On failure nothing is
        left mounted; the volume directory is left for the caller's leftover cleanup."""
        size = quota.parse_volume_size(record.options["size"])
        try:
            image.create(size)
            image.mount()
            with self._open_managed(record, BackendError) as tree:
                # A fresh ext4 has lost+found; Docker copies image content only into an
                # *empty* volume, so it must go (fsck makes it again if it ever needs it).
                tree.rmtree(quota.LOST_FOUND)
        except (quota.SizeLimitError, OSError, BackendError) as exc:
            with contextlib.suppress(quota.SizeLimitError, OSError):
                image.release()
            raise BackendError(
                f"cannot create the {record.options['size']} image of volume {record.name!r}: {exc}"
            ) from None

    def _open_managed(self, record: VolumeRecord, error: type[PluginError]) -> Tree:
        """A managed volume's data directory, opened beneath stowage's own volumes directory
        (which no container can write; opened confined all the same, like path= volumes)."""
        rel = f"{encode_name(record.name)}/data"
        try:
            return Tree.beneath(self.volumes_dir, rel)
        except OSError as exc:
            raise error(
                f"cannot open data directory {self.volumes_dir / rel} of volume "
                f"{record.name!r}: {exc.strerror}"
            ) from None

    def _apply_ownership(self, record: VolumeRecord, tree: Tree) -> None:
        """Owner and mode of the volume root, set through its descriptor (never a path)."""
        opts = record.options
        try:
            if "uid" in opts or "gid" in opts:
                uid = parse_id(opts["uid"]) if "uid" in opts else -1
                gid = parse_id(opts["gid"]) if "gid" in opts else -1
                tree.lchown("", uid, gid)
            if "mode" in opts:
                tree.chmod("", parse_mode(opts["mode"]))
            elif "path" not in opts:
                tree.chmod("", 0o755)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise BackendError(f"cannot set owner/mode of {tree.shown}: {exc.strerror}") from exc

    def _open_data(self, record: VolumeRecord) -> Tree:
        """The volume's data directory as a descriptor; MountError if it cannot be served."""
        if "path" not in record.options:
            return self._open_managed(record, MountError)
        path = self.data_path(record)
        try:
            return self._open_host_dir(path)
        except _HostDirError as exc:
            hint = (
                "recreate it, or remove the volume"
                if exc.missing
                else "restore the real directory, or remove the volume"
            )
            raise MountError(
                f"host directory {path} of volume {record.name!r} {exc}; {hint}"
            ) from None

    def mount(self, record: VolumeRecord) -> Path:
        target = self.mountpoint(record)
        if "path" in record.options:
            staged = False
        else:
            data = self.data_path(record)
            if not data.is_dir():
                raise MountError(
                    f"data directory {data} of volume {record.name!r} is missing; was stowage's "
                    "root moved or cleaned? Remove and recreate the volume to start empty"
                )
            # Before Docker binds the data directory (or we bind it): the image must be there.
            self._mount_image(record, MountError)
            staged = self.stager.mount(record, data, self._volume_dir(record))
            if not staged and target == data:
                return target  # a legacy read-write volume: Docker binds the data directory
        with self._open_data(record) as tree:
            if staged:
                self._apply_ownership(record, tree)  # the copy may have set the source's
            if self._binds(record):
                self._bind(tree, target, readonly=self._readonly(record))
        return target

    def _bind(self, tree: Tree, target: Path, readonly: bool) -> None:
        """Bind the opened directory at *target* (mount(2) gets /proc/self/fd/N, so what was
        opened is bound, whatever its path names by now). A bind already there is kept if it
        shows that very directory, and replaced otherwise (e.g. the directory was recreated)."""
        try:
            target.mkdir(parents=True, exist_ok=True)
            if mounts.is_mountpoint(target):
                if _same_dir(target, tree.fd):
                    return
                log.warning("%s no longer shows %s: binding it again", target, tree.shown)
                _detach(target)
            mounts.bind_mount(Path(tree.proc_path()), target, readonly=readonly)
        except OSError as exc:
            raise MountError(f"cannot bind {tree.shown} at {target}: {exc}") from exc

    def unmount(self, record: VolumeRecord) -> None:
        self._unbind(record)
        self.stager.unmount(record)

    def _unbind(self, record: VolumeRecord) -> None:
        target = self.mountpoint(record)
        if target == self.data_path(record):
            return
        try:
            _detach(target)
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
        self.dirs.discard(encode_name(record.name))  # releases a size= volume's image first

    def status(self, record: VolumeRecord) -> dict[str, Any]:
        status: dict[str, Any] = {"data": str(self.data_path(record))}
        image = self._image(record)
        if image is not None:
            status["size"] = image.usage().as_status()
        if "path" not in record.options:
            status.update(
                self.stager.status(record, self.data_path(record), self._volume_dir(record))
            )
        return status

    def recover(self, record: VolumeRecord, mounted: bool) -> None:
        # Every size-limited volume's image, mounted or not by a container (after a reboot
        # nothing is mounted): staging and Status read the data directory too.
        self._mount_image(record, BackendError)
        if "path" not in record.options:
            self.stager.recover(record, self.data_path(record), self._volume_dir(record), mounted)
        if self.mountpoint(record) == self.data_path(record):
            return
        if mounted:
            self.mount(record)
        else:
            self.unmount(record)

    def housekeeping(self) -> None:
        self.dirs.empty_trash()

    def leftover_names(self) -> list[str]:
        """Names that have a directory under `<root>/volumes`. At start the driver passes those
        it has no record of to `discard_leftover`, holding each name's lock."""
        return self.dirs.names()

    def discard_leftover(self, name: str) -> bool:
        """Delete what an interrupted Create left of *name* (plugin.backends.volumedirs)."""
        return self.dirs.discard_leftover(name)


class _HostDirError(Exception):
    """Why a `path=` directory cannot be served; the message completes "host directory X ..."."""

    def __init__(self, problem: str, missing: bool = False) -> None:
        super().__init__(problem)
        #: The directory is gone (or not a directory): not an attack, just absent.
        self.missing = missing


def _swapped(base: Path) -> str:
    return (
        f"is now a symlink, or a directory between the allowed path {base} and it was "
        "replaced by one; stowage follows no symlink beneath an allowed path, since it could "
        "lead outside the allowed paths"
    )


def _is_link(base: Path, rel: str) -> bool:
    try:
        with Tree.at(base) as root:
            return stat.S_ISLNK(root.lstat(rel).st_mode)
    except OSError:
        return False


def _same_dir(target: Path, fd: int) -> bool:
    """True if the mount at *target* shows the directory open as *fd*."""
    try:
        shown = os.stat(target)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (shown.st_dev, shown.st_ino) == (opened.st_dev, opened.st_ino)


def _detach(target: Path) -> None:
    """Detach every mount stacked at *target* (bounded: a few at most)."""
    for _ in range(8):
        if not mounts.is_mountpoint(target):
            return
        mounts.lazy_unmount(target)
    raise OSError(errno.EBUSY, "mounts keep reappearing", str(target))
