"""Size-limited local volumes (`-o size=`): a loop-mounted ext4 image per volume
(plugin/backends/quota.py), through the driver core on a temporary root. Needs root and loop
devices, like the daemon does. Every test's images are unmounted and their loop devices
detached afterwards, even when the test fails, and the test fails if any were left attached."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.dockerd import unmount_under

from plugin import cli
from plugin.backends.local import LocalBackend
from plugin.backends.quota import (
    IMAGE_NAME,
    LoopImage,
    loop_devices_of,
    parse_volume_size,
    project_quota_support,
    unsupported_reason,
)
from plugin.driver import VolumeDriver
from plugin.errors import InvalidOptionError, MountError, PluginError
from plugin.names import encode_name
from plugin.settings import Settings

MIB = 1 << 20
ID1 = "1" * 64
ID2 = "2" * 64

DriverFactory = Callable[..., VolumeDriver]

_reason = unsupported_reason() if os.geteuid() == 0 else "needs root (mount, loop devices)"
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _images_under(root: Path) -> list[Path]:
    volumes = root / "volumes"
    if not volumes.is_dir():
        return []
    return [d / IMAGE_NAME for d in volumes.iterdir() if (d / IMAGE_NAME).exists()]


def _losetup_j(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(autouse=True)
def released_images(settings: Settings) -> Iterator[list[Path]]:
    """Images the test made (it may append more); afterwards everything under the root is
    unmounted and every loop device backed by one of them detached. Then `losetup -j` must
    show none: a test that leaks a device fails."""
    seen: list[Path] = []
    yield seen
    seen.extend(_images_under(settings.root))
    unmount_under(settings.root)
    leaked = {}
    for image in seen:
        devices = loop_devices_of(image)
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], check=False)
        if devices:
            leaked[str(image)] = devices
    for image in seen:
        assert _losetup_j(image) == "", f"{image} still has a loop device"
    assert not leaked, f"loop devices left attached by the test: {leaked}"


def backend_of(driver: VolumeDriver) -> LocalBackend:
    backend = driver._backends["local"]
    assert isinstance(backend, LocalBackend)
    return backend


def image_of(settings: Settings, name: str) -> LoopImage:
    return LoopImage(settings.root / "volumes" / encode_name(name))


def mount_count(path: Path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == real)


def fill(path: Path, limit: int) -> int:
    """Write zeros to *path* until ENOSPC (or *limit* bytes); the bytes written."""
    written = 0
    chunk = b"\0" * MIB
    with open(path, "wb") as f:
        try:
            while written < limit:
                written += f.write(chunk)
                f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc
            return written
    raise AssertionError(f"wrote {written} bytes into {path} without hitting the limit")


def test_sizes() -> None:
    assert parse_volume_size("16M") == 16 * MIB
    assert parse_volume_size("10G") == 10 << 30
    assert parse_volume_size("8388609") == 8 * MIB + 4096  # whole 4 KiB blocks
    with pytest.raises(ValueError, match="at least 8M"):
        parse_volume_size("4M")


def test_limit_is_enforced_and_data_below_it_intact(
    driver: VolumeDriver, settings: Settings
) -> None:
    driver.create("v", {"size": "32M", "uid": "1000", "mode": "0750"})
    image = image_of(settings, "v")
    data = image.data
    assert image.image.stat().st_size == 32 * MIB
    assert image.image.stat().st_blocks * 512 < 8 * MIB, "the image must be sparse"
    assert mount_count(data) == 1, "Create mounts the image on the data directory"
    assert os.listdir(data) == [], "no lost+found: Docker copies up into empty volumes only"
    st = os.stat(data)
    assert (st.st_uid, st.st_mode & 0o7777) == (1000, 0o750), "options apply to the image's root"

    mountpoint = Path(driver.mount("v", ID1))
    assert mountpoint == data
    driver.mount("v", ID2)
    assert mount_count(data) == 1, "Mount when already mounted is idempotent"

    keep = os.urandom(3 * MIB)
    (data / "keep.bin").write_bytes(keep)
    written = fill(data / "big.bin", 64 * MIB)
    assert 16 * MIB < written < 32 * MIB
    assert (data / "keep.bin").read_bytes() == keep, "data below the limit is intact"

    status = driver.get("v").status["size"]
    assert status["method"] == "loop image"
    assert status["limit"] == 32 * MIB
    assert status["mounted"] is True
    assert 24 * MIB < status["total"] <= 32 * MIB
    assert status["used"] >= written + len(keep)
    assert status["available"] < MIB
    assert status["image_allocated"] >= written

    driver.unmount("v", ID1)
    driver.unmount("v", ID2)
    assert mount_count(data) == 1, "the image stays mounted while the volume exists"
    driver.remove("v")
    assert not image.image.exists() and not data.exists(), "Remove deletes the image"
    assert _losetup_j(image.image) == "", "Remove detaches the loop device"
    assert mount_count(data) == 0


def test_mount_after_reboot_mounts_the_image_again(
    make_driver: DriverFactory, settings: Settings
) -> None:
    first = make_driver()
    first.create("v", {"size": "16M"})
    image = image_of(settings, "v")
    (image.data / "f").write_text("before the reboot\n")
    image.release()  # a reboot: no mount, no loop device
    assert not (image.data / "f").exists()

    second = make_driver(boot_id="boot-2")  # Docker's Mount can come before recovery
    assert Path(second.mount("v", ID1)) == image.data
    assert (image.data / "f").read_text() == "before the reboot\n"
    assert mount_count(image.data) == 1


def test_recovery_mounts_every_image(make_driver: DriverFactory, settings: Settings) -> None:
    first = make_driver()
    first.create("idle", {"size": "16M"})
    first.create("busy", {"size": "16M"})
    first.mount("busy", ID1)
    for name in ("idle", "busy"):
        (image_of(settings, name).data / "f").write_text(name)
    first.close()
    for name in ("idle", "busy"):
        image_of(settings, name).release()  # the daemon crashed and the host rebooted

    second = make_driver(boot_id="boot-2")
    second.recover()
    for name in ("idle", "busy"):
        data = image_of(settings, name).data
        assert (data / "f").read_text() == name
        assert second.get(name).status["size"]["mounted"] is True
    # The same daemon recovering again (a restart without a reboot) changes nothing.
    third = make_driver(boot_id="boot-2")
    third.recover()
    assert all(mount_count(image_of(settings, n).data) == 1 for n in ("idle", "busy"))


def can_grow_online() -> bool:
    """ext4's online resize ioctl needs CAP_SYS_RESOURCE (some sandboxes drop it)."""
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> 24 & 1)


def test_resize_grows_and_refuses_to_shrink(
    driver: VolumeDriver, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    driver.create("v", {"size": "16M"})
    data = Path(driver.mount("v", ID1))
    keep = os.urandom(2 * MIB)
    (data / "keep.bin").write_bytes(keep)
    before = fill(data / "a.bin", 32 * MIB)
    total_before = driver.get("v").status["size"]["total"]
    root = ["--root", str(settings.root)]

    # A file held open, as a running container's would be, across the resize: grown online
    # where the kernel allows it (CAP_SYS_RESOURCE), else refused as busy, changing nothing.
    with open(data / "b.bin", "wb") as f:
        code = cli.main(["volume", "resize", "v", "40M", *root])
        err = capsys.readouterr().err
        if can_grow_online():
            assert code == 0, err
            f.write(os.urandom(16 * MIB))
            f.flush()
            os.fsync(f.fileno())
        else:
            assert code == 2
            assert "offline growing needs the volume unused: stop the containers" in err
            assert mount_count(data) == 1 and (data / "keep.bin").read_bytes() == keep
    if not can_grow_online():
        # Unused now: grown offline (unmounted, checked, grown, mounted again).
        assert cli.main(["volume", "resize", "v", "40M", *root]) == 0
        err = capsys.readouterr().err
        (data / "b.bin").write_bytes(os.urandom(16 * MIB))
    assert "grown from 16.0 MiB to 40.0 MiB" in err
    assert (data / "keep.bin").read_bytes() == keep
    assert os.path.getsize(data / "a.bin") == before
    assert sorted(os.listdir(data)) == ["a.bin", "b.bin", "keep.bin"], "no lost+found left"
    status = driver.get("v").status["size"]
    assert status["limit"] == 40 * MIB
    assert status["total"] > total_before + 20 * MIB
    assert driver.get("v").status["options"] == {"size": "16M"}, "the option Docker re-sends"
    assert mount_count(data) == 1
    assert len(loop_devices_of(image_of(settings, "v").image)) == 1

    assert cli.main(["volume", "resize", "v", "24M", *root]) == 2
    err = capsys.readouterr().err
    assert "cannot shrink from 40.0 MiB to 24.0 MiB: only growing is supported" in err
    assert cli.main(["volume", "resize", "v", "40M", *root]) == 0
    assert "already 40.0 MiB" in capsys.readouterr().err

    driver.create("plain", {})
    assert cli.main(["volume", "resize", "plain", "40M", *root]) == 2
    assert "has no size limit" in capsys.readouterr().err
    assert cli.main(["volume", "resize", "nope", "40M", *root]) == 2
    assert "no local volume 'nope'" in capsys.readouterr().err
    assert cli.main(["volume", "resize", "../x", "40M", *root]) == 2
    assert "'.' or '..'" in capsys.readouterr().err

    driver.unmount("v", ID1)
    driver.remove("v")
    assert _losetup_j(image_of(settings, "v").image) == ""


def test_resize_of_an_unmounted_image_mounts_it_where_the_daemon_would(
    driver: VolumeDriver, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    driver.create("v", {"size": "16M"})
    image = image_of(settings, "v")
    (image.data / "f").write_text("kept\n")
    image.release()  # after a reboot, before the daemon ran
    assert cli.main(["volume", "resize", "v", "24M", "--root", str(settings.root)]) == 0
    capsys.readouterr()
    assert (image.data / "f").read_text() == "kept\n"
    assert driver.get("v").status["size"]["limit"] == 24 * MIB
    assert driver.get("v").status["size"]["total"] > 18 * MIB


def test_options_are_checked(driver: VolumeDriver, settings: Settings) -> None:
    with pytest.raises(InvalidOptionError, match="at least 8M"):
        driver.create("small", {"size": "1M"})
    with pytest.raises(InvalidOptionError, match="expected a size"):
        driver.create("bad", {"size": "lots"})
    host = settings.allowed_paths[0] / "host"
    host.mkdir()
    with pytest.raises(InvalidOptionError, match="managed volumes only"):
        driver.create("p", {"size": "16M", "path": str(host)})
    driver.create("v", {"size": "16M"})
    driver.create("v", {"size": "16M"})  # Docker re-sends Create: a no-op
    assert mount_count(image_of(settings, "v").data) == 1
    with pytest.raises(PluginError, match="different options"):
        driver.create("v", {"size": "32M"})  # different options: refused, as for any option
    assert _images_under(settings.root) == [image_of(settings, "v").image]


def test_readonly_size_limited_volume_binds_the_image(
    driver: VolumeDriver, settings: Settings
) -> None:
    driver.create("ro", {"size": "16M", "readonly": "true"})
    (image_of(settings, "ro").data / "f").write_text("x")
    target = Path(driver.mount("ro", ID1))
    assert target != image_of(settings, "ro").data
    assert (target / "f").read_text() == "x", "the bind shows the image's filesystem"
    with pytest.raises(OSError, match="Read-only file system"):
        (target / "g").write_text("y")
    driver.unmount("ro", ID1)
    driver.remove("ro")


def test_leftover_with_an_image_is_released(make_driver: DriverFactory, settings: Settings) -> None:
    """A Create interrupted after the image was mounted but before the record: the next start
    finds an empty data directory and deletes it, unmounting the image first."""
    backend = backend_of(make_driver())
    image = image_of(settings, "lost")
    image.volume_dir.mkdir(parents=True)
    image.data.mkdir()
    image.create(16 * MIB)
    image.mount()
    assert mount_count(image.data) == 1
    image.release()  # and after a reboot it is not even mounted
    assert backend.discard_leftover("lost") is True
    assert not image.volume_dir.exists()
    assert _losetup_j(image.image) == ""

    # A size-limited volume with files but no record (a lost state database) is kept, files
    # and all, and not left mounted.
    kept = image_of(settings, "kept")
    kept.volume_dir.mkdir(parents=True)
    kept.data.mkdir()
    kept.create(16 * MIB)
    kept.mount()
    (kept.data / "precious").write_text("mine")
    kept.release()
    assert backend.discard_leftover("kept") is False
    assert kept.image.exists() and mount_count(kept.data) == 0
    kept.mount()
    assert (kept.data / "precious").read_text() == "mine"


def test_stage_in_that_cannot_fit_fails_before_copying(
    driver: VolumeDriver, settings: Settings
) -> None:
    src = settings.allowed_paths[0] / "big"
    src.mkdir()
    for i in range(3):
        (src / f"part{i}.bin").write_bytes(os.urandom(8 * MIB))
    driver.create("v", {"size": "16M", "stage_in": str(src)})
    data = image_of(settings, "v").data
    with pytest.raises(MountError) as caught:
        driver.mount("v", ID1)
    message = str(caught.value)
    assert "holds 24.0 MiB (25165824 bytes), more than volume 'v' can hold" in message
    assert "free" in message and "nothing was copied" in message
    assert [p for p in data.rglob("*") if p.is_file()] == [], "no byte was copied"
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "failed"
    assert "more than volume 'v' can hold" in status["last_error"]

    # Grown, the same volume takes the source at the next Mount.
    assert cli.main(["volume", "resize", "v", "40M", "--root", str(settings.root)]) == 0
    driver.mount("v", ID1)
    assert sorted(p.name for p in data.iterdir()) == ["part0.bin", "part1.bin", "part2.bin"]
    assert (data / "part1.bin").read_bytes() == (src / "part1.bin").read_bytes()


def test_stage_in_that_fits_is_copied(driver: VolumeDriver, settings: Settings) -> None:
    src = settings.allowed_paths[0] / "small"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(4 * MIB))
    driver.create("v", {"size": "16M", "stage_in": str(src)})
    data = Path(driver.mount("v", ID1))
    assert (data / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_project_quota_detection_agrees_with_findmnt(settings: Settings) -> None:
    """The capability check kept for the project-quota follow-up (quota.py's docstring)."""
    settings.root.mkdir(parents=True, exist_ok=True)
    fstype, options = subprocess.run(
        ["findmnt", "-no", "FSTYPE,OPTIONS", "--target", str(settings.root)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    quota = bool({"prjquota", "pquota", "pqnoenforce"} & set(options.split(",")))
    expected = fstype if quota and fstype in ("ext4", "xfs") else None
    assert project_quota_support(settings.root) == expected


def test_backup_and_restore_use_the_image_even_before_the_daemon_mounted_it(
    driver: VolumeDriver, settings: Settings, tmp_path: Path
) -> None:
    driver.create("v", {"size": "16M"})
    image = image_of(settings, "v")
    (image.data / "f").write_text("in the image\n")
    image.release()  # a reboot, and the daemon has not started yet
    dest = tmp_path / "backup"
    root = ["--root", str(settings.root)]
    assert cli.main(["volume", "backup", "v", str(dest), *root]) == 0
    assert (dest / "f").read_text() == "in the image\n", "backup read the image, not beneath"
    image.release()
    (dest / "g").write_text("restored\n")
    assert cli.main(["volume", "restore", str(dest), "v", *root]) == 0
    image.release()
    assert os.listdir(image.data) == [], "nothing was restored beneath the image"
    image.mount()
    assert (image.data / "g").read_text() == "restored\n"
