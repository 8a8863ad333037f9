"""Staged local volumes through the driver core, staging from a host path (fast, no S3): Mount
waits for stage-in within its bound, policies once/always, prefetch, failures, a restart during
stage-in, the copy-up marker and option validation. A restart is a second driver on one root."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.backends.local import LocalBackend
from plugin.backends.staged.marker import MARKER_NAME
from plugin.backends.staged.state import STATE_FILE
from plugin.driver import VolumeDriver
from plugin.errors import InvalidOptionError, MountError
from plugin.settings import Settings

ID1 = "1" * 64
ID2 = "2" * 64

DriverFactory = Callable[..., VolumeDriver]


def stager_of(driver: VolumeDriver) -> LocalBackend:
    backend = driver._backends["local"]
    assert isinstance(backend, LocalBackend)
    return backend


def wait_idle(driver: VolumeDriver, name: str, timeout: float = 30.0) -> None:
    assert stager_of(driver).stager.wait_idle(name, timeout), f"staging of {name} still running"


@pytest.fixture
def source(settings: Settings) -> Path:
    src = settings.allowed_paths[0] / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (src / "empty-dir").mkdir()
    os.symlink("a.txt", src / "link")
    return src


def slow_source(settings: Settings, files: int = 12) -> Path:
    """~768 KiB: about 3 s at stage_bwlimit=256K."""
    src = settings.allowed_paths[0] / "slow"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:02}.bin").write_bytes(os.urandom(64 * 1024))
    return src


def test_first_mount_sees_staged_tree(driver: VolumeDriver, source: Path) -> None:
    driver.create("v", {"stage_in": str(source)})
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "none" and status["completed_once"] is False
    mountpoint = Path(driver.mount("v", ID1))
    assert (mountpoint / "a.txt").read_text() == "alpha\n"
    assert (mountpoint / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    assert (mountpoint / "empty-dir").is_dir()
    assert os.readlink(mountpoint / "link") == "a.txt"
    assert not (mountpoint / MARKER_NAME).exists()  # non-empty: Docker will not copy up
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "done" and status["completed_once"] is True
    assert status["files_done"] == status["files_total"] == 3
    assert status["bytes_done"] == status["bytes_total"] == 300_006 + 5  # + the symlink's target
    assert status["source"] == str(source)


def test_policy_once_stages_only_the_first_mount(driver: VolumeDriver, source: Path) -> None:
    driver.create("v", {"stage_in": str(source)})
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "a.txt").write_text("changed by a container\n")
    driver.unmount("v", ID1)
    (source / "new.txt").write_text("new\n")
    driver.mount("v", ID2)
    assert (mountpoint / "a.txt").read_text() == "changed by a container\n"
    assert not (mountpoint / "new.txt").exists()


def test_policy_always_refreshes_on_every_first_mount(driver: VolumeDriver, source: Path) -> None:
    driver.create("v", {"stage_in": str(source), "stage_in_policy": "always"})
    mountpoint = Path(driver.mount("v", ID1))
    (source / "new.txt").write_text("new\n")
    driver.mount("v", ID2)  # already mounted: no refresh under a running container
    assert not (mountpoint / "new.txt").exists()
    driver.unmount("v", ID2)
    driver.unmount("v", ID1)
    driver.mount("v", ID1)
    assert (mountpoint / "new.txt").read_text() == "new\n"
    assert driver.get("v").status["stage_in"]["attempts"] == 2


def test_prefetch_stages_at_create(driver: VolumeDriver, source: Path) -> None:
    driver.create("v", {"stage_in": str(source), "prefetch": "true"})
    wait_idle(driver, "v")
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "done"
    data = Path(driver.get("v").status["data"])
    assert (data / "a.txt").read_text() == "alpha\n"
    driver.mount("v", ID1)
    assert driver.get("v").status["stage_in"]["attempts"] == 1  # not staged again


def test_mount_fails_after_stage_timeout_with_progress_then_succeeds(
    driver: VolumeDriver, settings: Settings
) -> None:
    src = slow_source(settings)
    driver.create("v", {"stage_in": str(src), "stage_timeout": "1", "stage_bwlimit": "256K"})
    with pytest.raises(MountError) as info:
        driver.mount("v", ID1)
    message = str(info.value)
    assert "still staging in" in message and "continues in the background" in message
    assert " of 768.0 KiB, " in message and " of 12 files" in message and "ETA" in message
    assert driver.get("v").status["mounts"] == 0
    assert driver.get("v").status["stage_in"]["state"] == "running"
    wait_idle(driver, "v")
    mountpoint = Path(driver.mount("v", ID1))
    assert len(list(mountpoint.iterdir())) == 12
    assert driver.get("v").status["stage_in"]["state"] == "done"


def test_stage_in_failure_fails_mount_and_next_mount_retries(
    driver: VolumeDriver, source: Path
) -> None:
    driver.create("v", {"stage_in": str(source)})
    moved = source.with_name("moved")
    source.rename(moved)
    with pytest.raises(MountError, match=r"stage-in of volume 'v' from .* failed: .*does not"):
        driver.mount("v", ID1)
    status = driver.get("v").status["stage_in"]
    assert status["state"] == "failed" and "does not exist" in status["last_error"]
    moved.rename(source)
    mountpoint = Path(driver.mount("v", ID1))
    assert (mountpoint / "a.txt").exists()


def test_restart_during_stage_in_resumes_at_recovery(
    make_driver: DriverFactory, settings: Settings
) -> None:
    src = slow_source(settings)
    first = make_driver()
    first.create("v", {"stage_in": str(src), "prefetch": "true", "stage_bwlimit": "256K"})
    state_file = settings.root / "volumes" / "v" / STATE_FILE
    assert json.loads(state_file.read_text())["stage_in"]["state"] == "running"
    # A "kill -9": the job stops without writing anything more.
    vol = stager_of(first).stager._volumes["v"]
    vol.cancel.set()
    assert vol.in_thread is not None
    vol.in_thread.join(10)
    assert json.loads(state_file.read_text())["stage_in"]["state"] == "running"
    copied = len([p for p in (settings.root / "volumes" / "v" / "data").iterdir()])
    assert copied < 12
    second = make_driver()
    assert second.get("v").status["stage_in"]["state"] == "running"  # from persisted state
    second.recover()
    wait_idle(second, "v")
    assert json.loads(state_file.read_text())["stage_in"]["state"] == "done"
    mountpoint = Path(second.mount("v", ID1))
    assert sorted(p.name for p in mountpoint.iterdir()) == sorted(p.name for p in src.iterdir())
    assert second.get("v").status["stage_in"]["attempts"] == 2


def test_empty_source_gets_copy_up_marker(driver: VolumeDriver, settings: Settings) -> None:
    src = settings.allowed_paths[0] / "empty"
    src.mkdir()
    driver.create("v", {"stage_in": str(src)})
    mountpoint = Path(driver.mount("v", ID1))
    assert [p.name for p in mountpoint.iterdir()] == [MARKER_NAME]


def test_status_of_unstaged_volume_has_no_staging(driver: VolumeDriver) -> None:
    driver.create("plain", None)
    status = driver.get("plain").status
    assert "stage_in" not in status and "stage_out" not in status


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage_in": "relative/path"}, "absolute host path"),
        ({"stage_in": "/etc"}, "is not under an allowed path"),
        ({"stage_in": "s3://x"}, "expected an S3 bucket name"),
        ({"stage_in_policy": "sometimes", "stage_in": "/x"}, "expected once or always"),
        ({"endpoint": "http://127.0.0.1:1"}, "only apply to staged volumes"),
        ({"prefetch": "true"}, "only apply to staged volumes"),
        ({"stage_timeout": "300", "stage_in": "/x"}, "Docker gives Mount two minutes"),
    ],
)
def test_bad_staging_options_are_refused(
    driver: VolumeDriver, options: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        driver.create("v", options)
    assert driver.list() == []


def test_host_stage_in_refuses_s3_options(driver: VolumeDriver, source: Path) -> None:
    with pytest.raises(InvalidOptionError, match="apply to S3 staging only"):
        driver.create("v", {"stage_in": str(source), "endpoint": "http://127.0.0.1:1"})


def test_staging_refused_on_path_volumes(driver: VolumeDriver, source: Path) -> None:
    with pytest.raises(InvalidOptionError, match="not to path= volumes"):
        driver.create("v", {"stage_in": str(source), "path": str(source)})


def test_remove_of_staged_volume_without_stage_out(driver: VolumeDriver, source: Path) -> None:
    driver.create("v", {"stage_in": str(source)})
    driver.mount("v", ID1)
    driver.unmount("v", ID1)
    driver.remove("v")
    assert driver.list() == []
    assert source.joinpath("a.txt").exists()  # the source is never touched


def test_unknown_option_message_lists_staging_options(driver: VolumeDriver) -> None:
    with pytest.raises(InvalidOptionError) as info:
        driver.create("v", {"stage_inn": "/x"})
    message = str(info.value)
    assert "unknown option 'stage_inn'" in message
    for option in ("stage_in", "stage_out", "stage_in_policy", "prefetch", "discard_unstaged"):
        assert f" {option}," in message or message.endswith(f" {option}")


def test_volume_root_options_survive_stage_in(driver: VolumeDriver, source: Path) -> None:
    source.chmod(0o777)
    driver.create("v", {"stage_in": str(source), "mode": "0750", "uid": "1234"})
    mountpoint = Path(driver.mount("v", ID1))
    st = mountpoint.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o750, 1234)
