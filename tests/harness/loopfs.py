"""A filesystem made in a sparse image and loop-mounted for one test: unmounted, detached
and checked gone even when the test fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

COMMAND_TIMEOUT_S = 60


def run(*argv: str) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    ).stdout


def loop_devices(image: Path) -> list[str]:
    out = run("losetup", "--noheadings", "--output", "NAME", "-j", str(image))
    return [line.strip() for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def loop_mounted(image: Path, mnt: Path, size: int, mkfs: tuple[str, ...]) -> Iterator[Path]:
    """*mkfs* (argv without the image) makes a filesystem in a sparse *size*-byte *image*,
    mounted on *mnt* for the block."""
    mnt.mkdir(exist_ok=True)
    with image.open("wb") as fh:
        fh.truncate(size)
    run(*mkfs, str(image))
    try:
        run("mount", "-o", "loop", str(image), str(mnt))
        yield mnt
    finally:
        if os.path.ismount(mnt):
            try:
                run("umount", str(mnt))
            except subprocess.SubprocessError:
                run("umount", "-l", str(mnt))  # something still holds it: detach lazily
        for device in loop_devices(image):
            run("losetup", "-d", device)
        with contextlib.suppress(OSError):
            image.unlink()
        assert loop_devices(image) == [], f"loop device of {image} left attached"
