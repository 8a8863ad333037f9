"""The directories of managed local volumes (`<root>/volumes/<encoded name>`): deleting one
without needing free space, emptying the trash of interrupted Removes, and finding what an
interrupted Create left.

Remove on a full filesystem: the volume directory is renamed into `<root>/trash` (made at
start, so the rename needs no new block) or, when even that cannot be done, deleted where it
is; either way nothing on the way to freeing the space needs free space (the state side is in
plugin/driver/state.py: its reserve file).

Leftovers: Create makes the directory first and the driver records the volume after it (a
record never names a directory that is not there), so a crash in between leaves a directory
with no record. Such a directory holds an empty data directory; it is deleted at the next start
(the driver asks, see `leftover_names`) or by the next Create of the name, never reused. A
directory with no record whose data directory is *not* empty was not left by a Create (a
replaced or lost state database?): it is kept, and Create of that name refuses with what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from plugin.backends import mounts, quota
from plugin.confined import Tree
from plugin.errors import BackendError
from plugin.names import decode_name, encode_name

log = logging.getLogger(__name__)


class VolumeDirs:
    """`<root>/volumes` and `<root>/trash` of one local backend."""

    def __init__(self, volumes_dir: Path, trash_dir: Path) -> None:
        self.volumes_dir = volumes_dir
        self.trash_dir = trash_dir

    def discard(self, encoded: str) -> None:
        """Delete `<root>/volumes/<encoded>` without needing free space (Remove is how a full
        filesystem gets space back).

        Normally it is renamed into the trash first, so it leaves its path atomically and the
        deletion, which may take long, happens there. A rename needs no new block when the trash
        directory exists (it is made at start) and has room for one more entry. Where the trash
        cannot take it (ENOSPC making the trash or growing it, or any other failure) the tree is
        deleted in place: deleting only frees space, and the volume's record is already marked
        removing, so nothing serves the half-deleted tree meanwhile."""
        try:
            volumes = Tree.at(self.volumes_dir)
        except FileNotFoundError:
            return
        self._release_image(encoded)
        with volumes:
            try:
                volumes.lstat(encoded)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise BackendError(
                    f"cannot remove data directory {volumes.display(encoded)}: {exc.strerror}"
                ) from exc
            trashed = f"{encoded}.{uuid.uuid4().hex}"
            try:
                self.trash_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                with Tree.at(self.trash_dir) as trash:
                    os.rename(encoded, trashed, src_dir_fd=volumes.fd, dst_dir_fd=trash.fd)
            except OSError as exc:
                log.warning(
                    "cannot move %s into %s (%s): deleting it where it is",
                    volumes.display(encoded),
                    self.trash_dir,
                    exc.strerror,
                )
                self._delete_in_place(volumes, encoded)
                return
        self._delete_trashed(trashed)

    def _release_image(self, encoded: str) -> None:
        """Unmount and detach the image of a size-limited volume before its directory goes:
        otherwise the deletion would walk into the mounted filesystem and could not remove it."""
        image = quota.LoopImage(self.volumes_dir / encoded)
        if not image.exists() and not mounts.is_mountpoint(image.data):
            return
        try:
            image.release()
        except (quota.SizeLimitError, OSError) as exc:
            raise BackendError(f"cannot release the image {image.image}: {exc}") from None

    def _delete_in_place(self, volumes: Tree, encoded: str) -> None:
        failures: list[str] = []

        def onerror(_func: object, failed: str, exc_info: object) -> None:
            failures.append(failed)
            log.warning("cannot delete %s: %s", failed, exc_info)

        _rmtree(encoded, volumes.fd, onerror)
        if failures:
            raise BackendError(
                f"cannot delete data directory {volumes.display(encoded)} ({len(failures)} "
                f"entries left, first {failures[0]}); see the log"
            )

    def _delete_trashed(self, entry: str) -> None:
        """Delete the trash entry *entry*. A link there is unlinked, never followed, and the
        tree is removed by shutil.rmtree's descriptor-based walk relative to the trash
        directory, which never follows a link planted in the data."""

        def onerror(_func: object, failed: str, exc_info: object) -> None:
            log.warning("cannot delete %s: %s (left in %s)", failed, exc_info, self.trash_dir)

        assert "/" not in entry, entry
        with Tree.at(self.trash_dir) as trash:
            try:
                st = os.stat(entry, dir_fd=trash.fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(entry, dir_fd=trash.fd)
                return
            _rmtree(entry, trash.fd, onerror)

    def empty_trash(self) -> None:
        """At start: finish the deletions interrupted Removes left in the trash, and make the
        trash directory now, while there is room, so a Remove on a full filesystem can rename."""
        if self.trash_dir.exists():
            for leftover in self.trash_dir.iterdir():
                log.info("deleting leftover of an interrupted Remove: %s", leftover)
                self._delete_trashed(leftover.name)
        try:
            self.trash_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot make the trash directory %s: %s", self.trash_dir, exc)

    def names(self) -> list[str]:
        """Names that have a directory under `<root>/volumes`."""
        try:
            with Tree.at(self.volumes_dir) as volumes:
                entries = volumes.scandir("")
        except FileNotFoundError:
            return []
        names = []
        for entry, _st in entries:
            name = decode_name(entry)
            if encode_name(name) != entry:
                log.warning("ignoring %s: not a name stowage encodes", self.volumes_dir / entry)
                continue
            names.append(name)
        return sorted(names)

    def discard_leftover(self, name: str) -> bool:
        """Delete the directory of *name*, which has no record, if it is what an interrupted
        Create leaves: a volume directory whose data directory is empty or missing. True if
        there is no directory now; False if it was kept because its data directory holds files
        (or is not a plain directory): those are not stowage's to delete (module docstring)."""
        encoded = encode_name(name)
        image = quota.LoopImage(self.volumes_dir / encoded)
        has_image = image.exists()
        if has_image:
            # A size-limited volume's files are in its image: look there, not underneath.
            try:
                image.mount()
            except (quota.SizeLimitError, OSError) as exc:
                log.warning("keeping %s: its image cannot be mounted: %s", image.volume_dir, exc)
                return False
        try:
            with Tree.beneath(self.volumes_dir, encoded) as vdir:
                try:
                    with vdir.subtree("data") as data:
                        entries = [e for e, _st in data.scandir("")]
                except FileNotFoundError:
                    entries = []  # the crash came before the data directory was made
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("keeping %s: %s", self.volumes_dir / encoded, exc)
            return False
        # A fresh image's lost+found: Create deletes it after mounting the image.
        empty = not [e for e in entries if not (has_image and e == quota.LOST_FOUND)]
        if not empty and has_image:
            with contextlib.suppress(quota.SizeLimitError, OSError):
                image.release()  # kept, but not served: not mounted either
        if not empty:
            log.warning(
                "keeping %s: it holds files but stowage has no record of volume %r (was the "
                "state database replaced?); move it elsewhere or delete it",
                self.volumes_dir / encoded,
                name,
            )
            return False
        log.warning(
            "deleting %s: left by a Create of volume %r that was interrupted before the "
            "volume was recorded",
            self.volumes_dir / encoded,
            name,
        )
        self.discard(encoded)
        return True


def _rmtree(name: str, dir_fd: int, onerror: Callable[[object, str, object], None]) -> None:
    """shutil.rmtree of *name* relative to *dir_fd*, with its descriptor-based walk (Linux),
    which never follows a link inside the tree."""
    assert shutil.rmtree.avoids_symlink_attacks
    # `onerror` is deprecated from 3.12 on in favour of `onexc`, which 3.11 lacks.
    if sys.version_info >= (3, 12):
        shutil.rmtree(name, dir_fd=dir_fd, onexc=onerror)
    else:
        shutil.rmtree(name, dir_fd=dir_fd, onerror=onerror)
