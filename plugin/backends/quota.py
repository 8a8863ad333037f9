"""Size-limited local volumes (`-o size=10G`): a sparse ext4 image per volume, loop-mounted on
the volume's data directory, so a container writing past the limit gets ENOSPC on any host.

Layout: `<root>/volumes/<encoded name>/image` is the image (sparse: it takes only the blocks
written), `image.lock` serialises this module's work on it between the daemon and
`stowage volume resize`, and the image's filesystem is mounted on `data` itself. Docker is
given `data` as before (or a bind of it), so nothing else in the local backend changes: every
access beneath the volume still goes through `plugin.confined.Tree`, which now simply starts
at the root of the image's filesystem.

The image stays mounted for the life of the volume, not only while containers use it: stage-in,
stage-out, `stowage volume backup|restore` and Status all see the data where they expect it,
and a mount does not vanish with a stopped daemon. Create formats and mounts it, Mount and
restart recovery mount it again where it is missing (after a reboot), Remove unmounts it (the
loop device goes with it: `mount -o loop` sets autoclear) before the directory is deleted.

Growing: `stowage volume resize NAME SIZE` (grow_image) extends the image, tells the loop device
(`losetup -c`) and grows ext4 online (`resize2fs`), while containers keep writing. Shrinking is
refused: ext4 cannot shrink while mounted, and a shrink below the data would lose files. The
volume's `size=` option keeps its value from Create (Docker re-sends Create with the options it
recorded, which must match); Status shows the current limit.

Project quotas (ext4/XFS `prjquota`) would avoid the image, but are not used yet: they need a
project id per volume kept stable across restarts, `FS_IOC_FSSETXATTR` with the inherit flag on
the data directory, `quotactl(Q_SETQUOTA, PRJQUOTA)` limits, and a `--root` filesystem mounted
with `prjquota` (Debian's default ext4 mount has none, so this host and CI could not test it).
`project_quota_support` reports whether a filesystem could do it, for that follow-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plugin.backends import mounts
from plugin.confined import Tree
from plugin.options import parse_size
from plugin.units import format_bytes

log = logging.getLogger(__name__)

IMAGE_NAME = "image"
LOCK_NAME = "image.lock"
LOST_FOUND = "lost+found"
#: Below this an ext4 image is mostly metadata and journal.
MIN_SIZE = 8 << 20
#: mkfs.ext4: no root reserve (the volume is the container's), 4 KiB blocks whatever the size
#: (small filesystems would get 1 KiB blocks), no discard pass over a fresh sparse file.
MKFS_ARGS = ("-q", "-F", "-m", "0", "-b", "4096", "-E", "nodiscard")
TOOLS = ("mkfs.ext4", "e2fsck", "resize2fs", "losetup", "mount")
COMMAND_TIMEOUT_S = 60.0
#: How long an unmounted image's loop device may take to detach itself.
DETACH_WAIT_S = 2.0


class SizeLimitError(Exception):
    """A size-limited volume's image cannot be made, mounted, grown or released."""


def parse_volume_size(value: str) -> int:
    """`size=` of a local volume: a byte count (parse_size), at least MIN_SIZE, in whole
    4 KiB blocks (rounded up)."""
    size = parse_size(value)
    if size < MIN_SIZE:
        raise ValueError(f"a size-limited volume needs at least {MIN_SIZE >> 20}M, got {value!r}")
    return -(-size // 4096) * 4096


def unsupported_reason() -> str | None:
    """Why loop images cannot be used on this host (None: they can)."""
    if not os.path.exists("/dev/loop-control"):
        return (
            "this host (or the managed plugin's container) has no /dev/loop-control: "
            "size-limited volumes need loop devices"
        )
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"size-limited volumes need {', '.join(missing)} (Debian packages e2fsprogs and mount)"
        )
    return None


def project_quota_support(path: Path) -> str | None:
    """The filesystem type under *path* if it is mounted with project quotas (ext4 or XFS
    `prjquota`/`pquota`), else None. Not used to serve volumes yet (module docstring)."""
    best: tuple[str, str] | None = None
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = mounts._unescape(left.split()[4])
            if (real == point or real.startswith(point.rstrip("/") + "/")) and (
                best is None or len(point) >= len(best[0])
            ):
                fields = right.split()
                best = (point, f"{fields[0]} {fields[2] if len(fields) > 2 else ''}")
    if best is None:
        return None
    fstype, _, options = best[1].partition(" ")
    opts = set(options.split(","))
    if fstype in ("ext4", "xfs") and opts & {"prjquota", "pquota", "pqnoenforce"}:
        return fstype
    return None


@dataclass(frozen=True)
class Usage:
    """Status of a size-limited volume, in bytes."""

    #: The image's size: the limit (what `size=` or the last resize asked for).
    limit: int
    #: What the image's filesystem offers (limit minus ext4's journal and tables), and what of
    #: it is used and still available. None while the image is not mounted.
    total: int | None = None
    used: int | None = None
    available: int | None = None
    #: Host bytes the sparse image takes.
    allocated: int = 0

    def as_status(self) -> dict[str, object]:
        status: dict[str, object] = {
            "method": "loop image",
            "limit": self.limit,
            "image_allocated": self.allocated,
            "mounted": self.total is not None,
        }
        if self.total is not None:
            status.update(total=self.total, used=self.used, available=self.available)
        return status


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SizeLimitError(f"{argv[0]} failed: {exc}") from None
    if done.returncode not in ok:
        text = (done.stderr or done.stdout).strip().splitlines()
        raise SizeLimitError(f"{' '.join(argv)}: {text[-1] if text else done.returncode}")
    return done.stdout


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices (`/dev/loopN`) whose backing file is *image* (read from sysfs, no
    subprocess: this runs at every Mount)."""
    target = os.path.realpath(image)
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir("/sys/block")):
            if not entry.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{entry}/loop/backing_file") as f:
                    backing = f.read().rstrip("\n")
            except OSError:
                continue  # not attached
            if backing == target:
                found.append(f"/dev/{entry}")
    return found


class LoopImage:
    """The image of one size-limited volume; *volume_dir* is `<root>/volumes/<encoded>`,
    a directory only root can write (the image is never reachable from a container)."""

    def __init__(self, volume_dir: Path) -> None:
        self.volume_dir = volume_dir
        self.image = volume_dir / IMAGE_NAME
        self.data = volume_dir / "data"

    def exists(self) -> bool:
        return self.image.is_file()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """flock of `image.lock`: excludes other threads (each opens its own description) and
        `stowage volume resize` in another process."""
        fd = os.open(self.volume_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- create / mount / release ----------------------------------------------------------------

    def create(self, size: int) -> None:
        """Make the sparse image and format it (the data directory must exist, empty)."""
        with self.locked():
            fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                self.image.unlink(missing_ok=True)
                raise
            os.close(fd)
            try:
                _run("mkfs.ext4", *MKFS_ARGS, str(self.image))
            except SizeLimitError:
                self.image.unlink(missing_ok=True)
                raise

    def mounted_device(self) -> str | None:
        """The loop device of the image if its filesystem is what `data` shows now."""
        try:
            shown = os.stat(self.data).st_dev
        except OSError:
            return None
        for dev in loop_devices_of(self.image):
            with contextlib.suppress(OSError):
                if os.stat(dev).st_rdev == shown:
                    return dev
        return None

    def mount(self) -> bool:
        """Mount the image on `data` unless it is there already (idempotent and cheap: one
        stat and a look at sysfs). True if it mounted it now."""
        with self.locked():
            return self._mount_locked()

    def _mount_locked(self) -> bool:
        if self.mounted_device() is not None:
            return False
        if not self.image.is_file():
            raise SizeLimitError(f"image {self.image} of a size-limited volume is missing")
        if mounts.is_mountpoint(self.data):
            # Something else is mounted there (a stale mount of a replaced image?): mounting
            # the image on top would only hide it; take it away instead.
            log.warning("%s shows another filesystem than %s: unmounting it", self.data, self.image)
            self._unmount_data()
        _run("mount", "-t", "ext4", "-o", "loop", str(self.image), str(self.data))
        return True

    def _unmount_data(self) -> None:
        """Unmount `data` (every mount stacked there); lazily if something still uses it."""
        for _ in range(8):
            if not mounts.is_mountpoint(self.data):
                return
            ret = mounts._libc.umount2(bytes(self.data), 0)
            if ret != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOENT):
                    return
                if err != errno.EBUSY:
                    raise SizeLimitError(f"cannot unmount {self.data}: {os.strerror(err)}")
                log.warning("%s is busy: detaching it lazily", self.data)
                try:
                    mounts.lazy_unmount(self.data)
                except OSError as exc:
                    raise SizeLimitError(f"cannot unmount {self.data}: {exc}") from None
        if mounts.is_mountpoint(self.data):
            raise SizeLimitError(f"cannot unmount {self.data}: mounts keep reappearing")

    def release(self) -> None:
        """Unmount the image and detach its loop devices (before the volume is deleted).
        A lazily detached, still busy mount keeps its device until its last user goes."""
        with self.locked():
            self._unmount_data()
            if self._wait_detached():
                return
            for dev in loop_devices_of(self.image):
                try:
                    _run("losetup", "-d", dev)
                except SizeLimitError as exc:
                    log.warning("cannot detach %s from %s: %s", dev, self.image, exc)
            if not self._wait_detached():
                log.warning("%s is still attached (in use?)", self.image)

    def _wait_detached(self) -> bool:
        """True once no loop device is backed by the image (within DETACH_WAIT_S): autoclear
        detaches a device after its last mount goes, asynchronously since Linux 5.17."""
        deadline = time.monotonic() + DETACH_WAIT_S
        while loop_devices_of(self.image):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- status / grow ---------------------------------------------------------------------------

    def usage(self) -> Usage:
        try:
            st = os.stat(self.image)
        except FileNotFoundError:
            return Usage(limit=0)
        limit, allocated = st.st_size, st.st_blocks * 512
        if self.mounted_device() is None:
            return Usage(limit=limit, allocated=allocated)
        vfs = os.statvfs(self.data)
        return Usage(
            limit=limit,
            total=vfs.f_blocks * vfs.f_frsize,
            used=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
            available=vfs.f_bavail * vfs.f_frsize,
            allocated=allocated,
        )

    def grow(self, size: int) -> tuple[int, int]:
        """Grow the image to *size* bytes and its filesystem with it. Returns (old size, new
        size); refuses to shrink. Online (`resize2fs` on the mounted loop device, containers
        keep writing) where the kernel allows it: it needs CAP_SYS_RESOURCE, which a root
        daemon normally has but some sandboxes drop. Otherwise offline, which needs the volume
        unused: unmounted, checked, grown and mounted again; refused if anything (a container)
        still holds the filesystem. The image is left mounted on `data` either way, where the
        daemon keeps it."""
        with self.locked():
            if not self.image.is_file():
                raise SizeLimitError(f"image {self.image} is missing")
            old = self.image.stat().st_size
            if size < old:
                raise SizeLimitError(
                    f"cannot shrink from {format_bytes(old)} to {format_bytes(size)}: only "
                    "growing is supported (ext4 cannot shrink while mounted, and a shrink below "
                    "the data would lose files); copy the data to a new, smaller volume instead "
                    "(stowage volume backup, then restore)"
                )
            self._mount_locked()
            dev = self.mounted_device()
            if dev is None:
                raise SizeLimitError(f"{self.image} is not mounted on {self.data}")
            if size > old:
                self._set_image_size(dev, size)
            try:
                _run("resize2fs", dev)
            except SizeLimitError as online:
                log.info("online grow of %s failed (%s): trying offline", self.image, online)
                try:
                    self._grow_offline(online)
                except SizeLimitError:
                    # Nothing grown: give the image its old size back (the filesystem uses
                    # no block past it), so the limit shown and a retry stay truthful.
                    dev = self.mounted_device()
                    if dev is not None and size > old:
                        self._set_image_size(dev, old)
                    raise
            return old, size

    def _set_image_size(self, dev: str, size: int) -> None:
        with open(self.image, "r+b") as f:
            os.ftruncate(f.fileno(), size)
        _run("losetup", "-c", dev)

    def _grow_offline(self, online: SizeLimitError) -> None:
        with Tree.at(self.data) as tree:
            had_lost_found = tree.exists(LOST_FOUND)
        busy = (
            f"cannot grow it online ({online}), and offline growing needs the volume unused: "
            "stop the containers using it and run the resize again"
        )
        ret = mounts._libc.umount2(bytes(self.data), 0)
        if ret != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                raise SizeLimitError(busy)
            raise SizeLimitError(f"cannot unmount {self.data}: {os.strerror(err)}")
        if not self._wait_detached():
            # Still mounted elsewhere (a container's mount namespace holds the filesystem): a
            # resize now would corrupt it. Mount it back (mount reuses the loop device).
            self._mount_locked()
            raise SizeLimitError(busy)
        try:
            # resize2fs wants a freshly checked filesystem; -p repairs only what is safe.
            # Exit 1: "errors corrected", e.g. lost+found made again (we deleted it).
            _run("e2fsck", "-f", "-p", str(self.image), ok=(0, 1))
            _run("resize2fs", str(self.image))
        finally:
            self._mount_locked()
        if not had_lost_found:
            with Tree.at(self.data) as tree:
                if tree.is_dir(LOST_FOUND) and not tree.scandir(LOST_FOUND):
                    tree.rmtree(LOST_FOUND)  # made by e2fsck; the volume had none (copy-up)
