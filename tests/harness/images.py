"""Test images built offline from Debian's `busybox-static`, imported with `docker import`.

Why not `docker pull busybox`: the test machines only reach PyPI and Debian mirrors. A static
busybox plus symlinks for its applets is a complete userland (sh, cat, stat, top, ...).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.dockerd import Dockerd

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_IMAGE = "stowage-test/busybox:latest"
DATA_IMAGE = "stowage-test/busybox-data:latest"
# The data image ships this file in /data, so a volume mounted there is seeded (copy-up).
SEED_PATH = "/data/seed.txt"
SEED_CONTENT = "seeded-from-image\n"
USER_UID = 1000
USER_GID = 1000

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    f"user:x:{USER_UID}:{USER_GID}:test user:/home/user:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = f"root:x:0:\nuser:x:{USER_GID}:\nnogroup:x:65534:\n"
# A fixed mtime keeps the tarball (and so the image layer) reproducible.
MTIME = 1_700_000_000


@dataclass(frozen=True)
class TestImages:
    """Tags of the images the e2e tests run."""

    __test__ = False  # not a pytest test class, despite the name

    busybox: str = BUSYBOX_IMAGE
    data: str = DATA_IMAGE
    seed_path: str = SEED_PATH
    seed_content: str = SEED_CONTENT


def busybox_applets(binary: Path = BUSYBOX_BINARY) -> list[str]:
    """Applet names this busybox build provides (`busybox --list`)."""
    out = subprocess.run(
        [str(binary), "--list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return sorted({name for name in out.split() if name and name != "busybox" and "/" not in name})


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755, uid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.uid = info.gid = uid
    info.mtime = MTIME
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def write_rootfs_tar(dest: Path, *, with_data: bool, binary: Path = BUSYBOX_BINARY) -> None:
    """A minimal rootfs: bin/ (busybox + applet symlinks), etc/passwd+group, tmp/, home/user/.

    With `with_data`, also /data/seed.txt for copy-up scenarios.
    """
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "etc", "root", "home"):
            _add_dir(tar, name, 0o700 if name == "root" else 0o755)
        _add_dir(tar, "home/user", 0o755, uid=USER_UID)
        _add_dir(tar, "tmp", 0o1777)
        _add_file(tar, "bin/busybox", binary.read_bytes(), 0o755)
        for applet in busybox_applets(binary):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            link.mode = 0o777
            link.mtime = MTIME
            tar.addfile(link)
        _add_file(tar, "etc/passwd", PASSWD.encode())
        _add_file(tar, "etc/group", GROUP.encode())
        if with_data:
            _add_dir(tar, "data")
            _add_file(tar, SEED_PATH.lstrip("/"), SEED_CONTENT.encode())


def image_exists(dockerd: Dockerd, tag: str) -> bool:
    return dockerd.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0


def build_test_images(dockerd: Dockerd) -> TestImages:
    """Import both test images into `dockerd` (once; reused if already present)."""
    images = TestImages()
    with tempfile.TemporaryDirectory(dir=dockerd.base) as tmp:
        for tag, with_data in ((images.busybox, False), (images.data, True)):
            if image_exists(dockerd, tag):
                continue
            tarball = Path(tmp) / "rootfs.tar"
            write_rootfs_tar(tarball, with_data=with_data)
            dockerd.docker("import", "--change", 'CMD ["sh"]', str(tarball), tag, timeout=120)
    return images
