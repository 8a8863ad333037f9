"""Staged local volumes against `rclone serve s3` on loopback, through the driver core: stage-in
from a prefix, stage-out after the last Unmount (with retries when the server is down), Remove
refusing to drop unuploaded data, mirror deletes, and Create validating the bucket."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from stagingkit import S3Server, start_rclone, wait_idle

from plugin.backends.staged import jobs as staging_mod
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import BackendError, InvalidOptionError
from plugin.settings import Settings
from plugin.wiring import build_backends

pytestmark = pytest.mark.s3

ID1 = "1" * 64


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[VolumeDriver]:
    settings = Settings(root=tmp_path / "root")
    settings.root.mkdir()
    made = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    yield made
    made.close()


@pytest.fixture(autouse=True)
def fast_stage_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 0.1)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_BACKOFF_S", 0.2)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_ATTEMPTS", 3)


def keys(server: S3Server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = server.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {
        o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listing.get("Contents", [])
    }


def s3_opts(server: S3Server, **extra: str) -> dict[str, str]:
    return {"endpoint": server.endpoint, "dir_markers": "false", **extra}


def test_stage_in_from_prefix_then_stage_out_changes(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    client = rclone_s3.client()
    client.put_object(Bucket=bucket, Key="in/a.txt", Body=b"alpha")
    client.put_object(Bucket=bucket, Key="in/deep/b.txt", Body=b"beta")
    driver.create(
        "v",
        s3_opts(rclone_s3, stage_in=f"s3://{bucket}/in", stage_out=f"s3://{bucket}/out"),
    )
    mountpoint = Path(driver.mount("v", ID1))
    assert (mountpoint / "a.txt").read_bytes() == b"alpha"
    assert (mountpoint / "deep" / "b.txt").read_bytes() == b"beta"
    status = driver.get("v").status
    assert status["stage_in"]["state"] == "done" and status["stage_in"]["files_done"] == 2
    assert status["stage_out"]["state"] == "none" and status["stage_out"]["last_success"] is None
    (mountpoint / "result.txt").write_text("computed\n")
    driver.unmount("v", ID1)
    assert driver.get("v").status["stage_out"]["state"] in ("pending", "running", "done")
    wait_idle(driver, "v")
    status = driver.get("v").status["stage_out"]
    assert status["state"] == "done", status
    assert status["last_success"] and status["files_total"] == 3
    assert keys(rclone_s3, bucket, "out/") == {
        "out/a.txt": b"alpha",
        "out/deep/b.txt": b"beta",
        "out/result.txt": b"computed\n",
    }
    driver.remove("v")  # everything uploaded: Remove proceeds


def test_empty_prefix_stages_nothing_and_marker_is_never_uploaded(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    driver.create(
        "v", s3_opts(rclone_s3, stage_in=f"s3://{bucket}/p", stage_out=f"s3://{bucket}/p")
    )
    mountpoint = Path(driver.mount("v", ID1))
    assert [p.name for p in mountpoint.iterdir()] == [staging_mod.MARKER_NAME]
    assert driver.get("v").status["stage_in"]["source_empty"] is True
    (mountpoint / "out.txt").write_text("x")
    driver.unmount("v", ID1)
    wait_idle(driver, "v")
    assert set(keys(rclone_s3, bucket)) == {"p/out.txt"}


def test_failed_stage_out_retries_then_blocks_remove(
    driver: VolumeDriver, tmp_path: Path, bucket_name: str
) -> None:
    server = start_rclone(tmp_path / "s3", tmp_path / "s3.log")
    try:
        bucket = server.make_bucket(bucket_name)
        driver.create("v", s3_opts(server, stage_out=f"s3://{bucket}/out"))
        mountpoint = Path(driver.mount("v", ID1))
        (mountpoint / "precious.txt").write_text("keep me\n")
        server.stop()
        driver.unmount("v", ID1)
        wait_idle(driver, "v", timeout=90)
        status = driver.get("v").status["stage_out"]
        assert status["state"] == "failed" and status["attempts"] == 3
        assert status["last_error"]
        with pytest.raises(BackendError, match="refusing to remove volume 'v': stage-out"):
            driver.remove("v")
        assert driver.get("v").status["stage_out"]["state"] == "failed"
        assert (mountpoint / "precious.txt").exists()
        # The server is back: the next mount/unmount cycle uploads and Remove proceeds.
        server = start_rclone(tmp_path / "s3", tmp_path / "s3.log", port=server.port)
        driver.mount("v", ID1)
        driver.unmount("v", ID1)
        wait_idle(driver, "v")
        assert driver.get("v").status["stage_out"]["state"] == "done"
        assert keys(server, bucket) == {"out/precious.txt": b"keep me\n"}
        driver.remove("v")
    finally:
        with contextlib.suppress(Exception):
            server.stop()


def test_discard_unstaged_allows_remove(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 30.0)
    bucket = rclone_s3.make_bucket(bucket_name)
    opts = s3_opts(rclone_s3, stage_out=f"s3://{bucket}/o")
    driver.create("keep", opts)
    driver.create("drop", {**opts, "discard_unstaged": "true"})
    for name in ("keep", "drop"):
        driver.mount(name, ID1)
        driver.unmount(name, ID1)
        assert driver.get(name).status["stage_out"]["state"] == "pending"
    with pytest.raises(BackendError, match="discard_unstaged=true"):
        driver.remove("keep")
    driver.remove("drop")
    assert [n for n, _ in driver.list()] == ["keep"]
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 0.1)


def test_mirror_deletes_remote_objects_gone_locally(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    client = rclone_s3.client()
    client.put_object(Bucket=bucket, Key="m/old.txt", Body=b"old")
    client.put_object(Bucket=bucket, Key="m/keep.txt", Body=b"keep")
    url = f"s3://{bucket}/m"
    driver.create("v", s3_opts(rclone_s3, stage_in=url, stage_out=url, stage_out_mirror="true"))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "old.txt").unlink()
    driver.unmount("v", ID1)
    wait_idle(driver, "v")
    assert keys(rclone_s3, bucket) == {"m/keep.txt": b"keep"}


def test_without_mirror_remote_objects_stay(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    rclone_s3.client().put_object(Bucket=bucket, Key="m/old.txt", Body=b"old")
    url = f"s3://{bucket}/m"
    driver.create("v", s3_opts(rclone_s3, stage_in=url, stage_out=url))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "old.txt").unlink()
    driver.unmount("v", ID1)
    wait_idle(driver, "v")
    assert keys(rclone_s3, bucket) == {"m/old.txt": b"old"}


def test_create_checks_the_bucket(driver: VolumeDriver, rclone_s3: S3Server) -> None:
    with pytest.raises(InvalidOptionError, match=r"s3://no-such-bucket-x/p: .*does not exist"):
        driver.create("v", s3_opts(rclone_s3, stage_in="s3://no-such-bucket-x/p"))
    with pytest.raises(InvalidOptionError, match="cannot reach S3 endpoint"):
        driver.create("v", {"stage_out": "s3://bucket/p", "endpoint": "http://127.0.0.1:9"})
    assert driver.list() == []


def test_profile_from_root_credentials_file(
    driver: VolumeDriver,
    rclone_s3: S3Server,
    bucket_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stagingkit import ACCESS_KEY, SECRET_KEY

    bucket = rclone_s3.make_bucket(bucket_name)
    rclone_s3.client().put_object(Bucket=bucket, Key="p/a.txt", Body=b"via profile")
    credentials = tmp_path / "root" / "credentials"
    credentials.write_text(
        f"[tenant]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    credentials.chmod(0o600)
    # Nothing in the daemon's environment: only the profile in <root>/credentials can work.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{bucket}/p"
    driver.create("v", s3_opts(rclone_s3, stage_in=url, stage_out=url, profile="tenant"))
    mountpoint = Path(driver.mount("v", ID1))
    assert (mountpoint / "a.txt").read_bytes() == b"via profile"
    (mountpoint / "b.txt").write_text("back")
    driver.unmount("v", ID1)
    wait_idle(driver, "v")
    assert driver.get("v").status["stage_out"]["state"] == "done"
    assert keys(rclone_s3, bucket) == {"p/a.txt": b"via profile", "p/b.txt": b"back"}


@pytest.mark.parametrize("dest", ["tree", "backup.tar.gz"])
def test_volume_backup_and_restore_through_s3(
    driver: VolumeDriver, rclone_s3: S3Server, bucket_name: str, tmp_path: Path, dest: str
) -> None:
    from plugin.cli import main

    bucket = rclone_s3.make_bucket(bucket_name)
    driver.create("src", None)
    data = Path(driver.get("src").mountpoint)
    (data / "sub").mkdir()
    (data / "sub" / "x.txt").write_text("x\n")
    (data / "big.bin").write_bytes(bytes(range(256)) * 40_000)
    driver.create("dst", None)
    common = ["--root", str(tmp_path / "root"), "--endpoint", rclone_s3.endpoint]
    url = f"s3://{bucket}/{dest}"
    assert main(["volume", "backup", "src", url, *common]) == 0
    assert main(["volume", "restore", url, "dst", *common]) == 0
    restored = Path(driver.get("dst").mountpoint)
    assert (restored / "sub" / "x.txt").read_text() == "x\n"
    assert (restored / "big.bin").read_bytes() == (data / "big.bin").read_bytes()
