"""Size-limited local volumes (`-o size=`) through a real dockerd: a container writing past the
limit gets ENOSPC and the data below it stays intact, `docker volume inspect` shows used and
total bytes, `stowage volume resize` grows the volume, a reboot-like loss of the mount is
repaired, and `docker volume rm` frees the image and its loop device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness.dockerd import wait_until

from e2e.helpers import E2E

pytestmark = pytest.mark.docker

MIB = 1 << 20


def image_path(e2e: E2E, name: str) -> Path:
    return Path(e2e.inspect_volume(name)["Status"]["data"]).parent / "image"


def losetup_j(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


def can_grow_online() -> bool:
    """ext4's online resize ioctl needs CAP_SYS_RESOURCE (some sandboxes drop it)."""
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> 24 & 1)


def stowage_cli(e2e: E2E, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plugin", *args, "--root", str(e2e.stowage.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_writes_past_the_limit_fail_with_enospc(e2e: E2E) -> None:
    name = e2e.create_volume(e2e.unique("sized"), size="32M")
    image = image_path(e2e, name)
    assert image.stat().st_size == 32 * MIB
    assert losetup_j(image), "the image is attached to a loop device while the volume exists"

    keep = e2e.run(
        "--rm", "-v", f"{name}:/vol", e2e.image, "sh", "-c",
        "head -c 4194304 /dev/urandom > /vol/keep && md5sum /vol/keep",
    ).stdout.split()[0]  # fmt: skip
    over = e2e.run(
        "--rm", "-v", f"{name}:/vol", e2e.image,
        "dd", "if=/dev/zero", "of=/vol/big", "bs=1M", "count=64",
        check=False,
    )  # fmt: skip
    assert over.returncode != 0, over
    assert "No space left on device" in over.stderr, over.stderr
    out = e2e.run(
        "--rm", "-v", f"{name}:/vol", e2e.image, "sh", "-c",
        "md5sum /vol/keep; ls -A /vol; stat -c %s /vol/big",
    ).stdout.split()  # fmt: skip
    assert out[0] == keep, "data below the limit is intact"
    assert out[2:4] == ["big", "keep"], "only the container's files (no lost+found)"
    assert 16 * MIB < int(out[4]) < 32 * MIB

    size = e2e.inspect_volume(name)["Status"]["size"]
    assert size["limit"] == 32 * MIB and size["mounted"] is True
    assert 24 * MIB < size["total"] <= 32 * MIB
    assert size["used"] > int(out[4]) + 4 * MIB - MIB
    assert size["available"] < MIB

    e2e.docker("volume", "rm", name)
    assert not image.exists(), "docker volume rm deletes the image"
    assert not image.parent.exists()
    assert losetup_j(image) == "", "and detaches its loop device"


def test_empty_sized_volume_gets_dockers_copy_up(e2e: E2E) -> None:
    """No lost+found in a fresh image: Docker copies image content into empty volumes only."""
    name = e2e.create_volume(e2e.unique("copyup"), size="16M")
    e2e.run("--rm", "-v", f"{name}:/etc", e2e.image, "true")
    data = Path(e2e.inspect_volume(name)["Status"]["data"])
    assert (data / "passwd").is_file()


def test_resize_and_remount_after_reboot(e2e: E2E) -> None:
    name = e2e.create_volume(e2e.unique("grow"), size="16M")
    image = image_path(e2e, name)
    e2e.run(
        "--rm", "-v", f"{name}:/vol", e2e.image, "sh", "-c",
        "echo kept > /vol/f; dd if=/dev/zero of=/vol/fill bs=1M count=32 2>/dev/null; true",
    )  # fmt: skip

    # While a container uses the volume: grown online where the kernel lets stowage
    # (CAP_SYS_RESOURCE), else refused with nothing changed and the container unharmed.
    holder = e2e.unique("holder")
    e2e.run("-d", "--name", holder, "-v", f"{name}:/vol", e2e.image, "sleep", "600")
    busy = stowage_cli(e2e, "volume", "resize", name, "24M")
    if can_grow_online():
        assert busy.returncode == 0, busy.stderr
        e2e.docker("exec", holder, "dd", "if=/dev/zero", "of=/vol/online", "bs=1M", "count=6")
        e2e.docker("exec", holder, "rm", "/vol/online")
    else:
        assert busy.returncode == 2, busy.stderr
        assert "stop the containers using it" in busy.stderr
        assert image.stat().st_size == 16 * MIB, "a refused resize changes nothing"
        assert len(losetup_j(image).splitlines()) == 1, "one loop device, shared"
        e2e.docker("exec", holder, "sh", "-c", "echo still > /vol/g && cat /vol/f")
    e2e.docker("rm", "-f", holder)

    shrink = stowage_cli(e2e, "volume", "resize", name, "8M")
    assert shrink.returncode == 2
    assert "only growing is supported" in shrink.stderr
    grow = stowage_cli(e2e, "volume", "resize", name, "48M")
    assert grow.returncode == 0, grow.stderr
    assert " to 48.0 MiB" in grow.stderr
    assert e2e.inspect_volume(name)["Status"]["size"]["total"] > 40 * MIB

    out = e2e.run(
        "--rm", "-v", f"{name}:/vol", e2e.image, "sh", "-c",
        "dd if=/dev/zero of=/vol/more bs=1M count=16 2>/dev/null && cat /vol/f",
    ).stdout  # fmt: skip
    assert out == "kept\n", "the grown volume takes 16 MiB more and keeps its data"

    # A reboot while stowage is down: its mounts and loop devices are gone. The next daemon
    # mounts the image again (recovery, or the first Mount if Docker is faster).
    e2e.crash_stowage()
    data = image.parent / "data"
    subprocess.run(["umount", str(data)], check=True)
    wait_until(lambda: losetup_j(image) == "", 10.0, what="the loop device to be released")
    e2e.stowage.start()
    out = e2e.run("--rm", "-v", f"{name}:/vol", e2e.image, "cat", "/vol/f").stdout
    assert out == "kept\n"
    assert e2e.inspect_volume(name)["Status"]["size"]["limit"] == 48 * MIB

    e2e.docker("volume", "rm", name)
    assert not image.exists() and losetup_j(image) == ""
