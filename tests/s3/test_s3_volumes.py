from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest
from harness import s3servers
from harness.s3servers import S3Server
from s3kit import DriverFactory, s3_options

from plugin.errors import BackendError, InvalidOptionError, MountError, VolumeNotFoundError

pytestmark = [pytest.mark.s3, pytest.mark.fuse]

ID1 = "1" * 64
ID2 = "2" * 64


def fuse_pid(root: Path, name: str) -> int:
    return int((root / "s3" / name / "fuse.pid").read_text().split()[0])


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_create_checks_bucket_and_endpoint(
    make_driver: DriverFactory, rclone_server: S3Server
) -> None:
    driver = make_driver()
    with pytest.raises(InvalidOptionError, match="backend=s3 needs -o bucket=NAME"):
        driver.create("v", {"backend": "s3", "endpoint": rclone_server.endpoint})
    with pytest.raises(
        InvalidOptionError,
        match=r"bucket 'no-such-bucket' at http://127\.0\.0\.1:\d+ does not exist",
    ):
        driver.create("v", s3_options(rclone_server, "no-such-bucket"))
    dead = f"http://127.0.0.1:{s3servers.free_port()}"
    started = time.monotonic()
    with pytest.raises(InvalidOptionError, match=f"cannot reach S3 endpoint {dead}"):
        driver.create("v", {"backend": "s3", "bucket": "any-bucket", "endpoint": dead})
    assert time.monotonic() - started < 30
    with pytest.raises(InvalidOptionError, match="looks like a credential"):
        driver.create("v", {**s3_options(rclone_server, "bbb"), "secret_key": "x"})
    with pytest.raises(InvalidOptionError, match="unknown option 'bukket'"):
        driver.create("v", {"backend": "s3", "bukket": "b"})
    assert driver.list() == []


def test_files_written_through_the_volume_land_in_s3(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    driver.create("data", s3_options(rclone_server, bucket, prefix="/app/"))
    assert driver.get("data").status["options"]["prefix"] == "app"
    mountpoint = Path(driver.mount("data", ID1))
    assert driver.get("data").status["fuse"] == "mounted"
    (mountpoint / "hello.txt").write_text("hello s3")
    rclone_server.client().put_object(Bucket=bucket, Key="app/from-boto3.txt", Body=b"hi")
    driver.unmount("data", ID1)
    body = rclone_server.client().get_object(Bucket=bucket, Key="app/hello.txt")["Body"].read()
    assert body == b"hello s3"
    assert driver.get("data").status["fuse"] == "not mounted"
    mountpoint = Path(driver.mount("data", ID2))
    assert sorted(os.listdir(mountpoint)) == ["from-boto3.txt", "hello.txt"]
    driver.unmount("data", ID2)


def test_dead_fuse_process_is_reported_and_remounted(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    driver.create("v", s3_options(rclone_server, bucket))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "before.txt").write_text("x")
    os.sync()
    os.kill(fuse_pid(root, "v"), signal.SIGKILL)
    wait_for(lambda: driver.get("v").status["fuse"].startswith("dead"))
    assert "see " in driver.get("v").status["fuse"]
    # The next container's Mount cleans the ENOTCONN mountpoint and mounts again.
    assert Path(driver.mount("v", ID2)) == mountpoint
    assert driver.get("v").status["fuse"] == "mounted"
    (mountpoint / "after.txt").write_text("y")
    driver.unmount("v", ID1)
    driver.unmount("v", ID2)
    keys = {o["Key"] for o in rclone_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert "after.txt" in keys


def test_restart_adopts_the_live_fuse_process(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    first = make_driver()
    first.create("v", s3_options(rclone_server, bucket))
    mountpoint = Path(first.mount("v", ID1))
    pid = fuse_pid(root, "v")
    first.close()

    second = make_driver()
    second.recover()
    assert fuse_pid(root, "v") == pid  # the same process: a running container keeps working
    assert second.get("v").status["fuse"] == "mounted"
    (mountpoint / "during.txt").write_text("z")
    second.unmount("v", ID1)
    wait_for(lambda: not Path(f"/proc/{pid}").exists())
    assert rclone_server.client().head_object(Bucket=bucket, Key="during.txt")["ContentLength"] == 1


def test_remove_keeps_objects_unless_asked(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client()
    client.put_object(Bucket=bucket, Key="keep/a.txt", Body=b"a")
    client.put_object(Bucket=bucket, Key="drop/b.txt", Body=b"b")
    driver = make_driver()
    driver.create("keep", s3_options(rclone_server, bucket, prefix="keep"))
    driver.create("drop", s3_options(rclone_server, bucket, prefix="drop", remove_data="true"))
    driver.mount("keep", ID1)
    driver.remove("keep")  # stale mount count: Docker already checked nothing uses it
    driver.remove("drop")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {"keep/a.txt"}
    assert not (root / "s3" / "keep").exists()
    with pytest.raises(VolumeNotFoundError):
        driver.get("keep")


def test_unuploaded_data_blocks_remove(
    make_driver: DriverFactory, private_rclone_server: S3Server, root: Path
) -> None:
    server = private_rclone_server
    bucket = server.new_bucket()
    driver = make_driver()
    driver.create("v", s3_options(server, bucket))
    mountpoint = Path(driver.mount("v", ID1))
    f = open(mountpoint / "precious.txt", "w")  # noqa: SIM115 (closed by hand, below)
    f.write("must not be lost")
    server.stop()  # S3 goes away before the upload at close
    with pytest.raises(OSError) as err:
        f.close()
    assert err.value.errno == errno.EIO  # the application sees the failed upload
    with pytest.raises(BackendError, match=r"1 file\(s\) could not be uploaded"):
        driver.unmount("v", ID1)
    assert driver.get("v").status["pending_uploads"] == 1
    with pytest.raises(BackendError, match="refusing to remove S3 volume 'v'"):
        driver.remove("v")
    server.start()
    driver.mount("v", ID2)  # the next mount retries the upload
    wait_for(lambda: "pending_uploads" not in driver.get("v").status, timeout=60)
    driver.unmount("v", ID2)
    body = server.client().get_object(Bucket=bucket, Key="precious.txt")["Body"].read()
    assert body == b"must not be lost"
    driver.remove("v")


def test_profiles_come_from_a_private_file_under_root(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    credentials = root / "credentials"
    credentials.write_text(
        "[tenant]\n"
        f"aws_access_key_id = {s3servers.ACCESS_KEY}\n"
        f"aws_secret_access_key = {s3servers.SECRET_KEY}\n"
    )
    credentials.chmod(0o644)
    with pytest.raises(BackendError, match="readable by others; run: chmod 600"):
        driver.create("v", s3_options(rclone_server, bucket, profile="tenant"))
    credentials.chmod(0o600)
    with pytest.raises(InvalidOptionError, match="profile 'nobody' not found"):
        driver.create("v", s3_options(rclone_server, bucket, profile="nobody"))
    driver.create("v", s3_options(rclone_server, bucket, profile="tenant"))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "f").write_text("via profile")
    driver.unmount("v", ID1)
    assert rclone_server.client().head_object(Bucket=bucket, Key="f")["ContentLength"] == 11
    cmdline = " ".join(driver.get("v").status)  # nothing secret in Status either
    assert s3servers.SECRET_KEY not in cmdline


def test_credentials_file_outside_root_as_a_managed_plugin_mounts_it(
    make_driver: DriverFactory,
    rclone_server: S3Server,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--credentials-file (the managed plugin's read-only `credentials` mount): profiles come
    from there, for Create's check and for the FUSE process; <root>/credentials is not read."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bucket = rclone_server.new_bucket()
    credentials = tmp_path / "etc" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text(
        "[tenant]\n"
        f"aws_access_key_id = {s3servers.ACCESS_KEY}\n"
        f"aws_secret_access_key = {s3servers.SECRET_KEY}\n"
    )
    credentials.chmod(0o600)
    root.mkdir(parents=True)
    (root / "credentials").write_text("[other]\naws_access_key_id = x\naws_secret_access_key = y\n")
    (root / "credentials").chmod(0o600)
    driver = make_driver(credentials_file=credentials)
    with pytest.raises(InvalidOptionError, match=f"'other' not found .*{credentials}"):
        driver.create("w", s3_options(rclone_server, bucket, profile="other"))
    driver.create("v", s3_options(rclone_server, bucket, profile="tenant"))
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "f").write_text("via mounted file")
    driver.unmount("v", ID1)
    assert rclone_server.client().head_object(Bucket=bucket, Key="f")["ContentLength"] == 16


def test_daemon_default_endpoint_is_stored_with_the_volume(
    make_driver: DriverFactory, rclone_server: S3Server, root: Path
) -> None:
    """--s3-endpoint (STOWAGE_S3_ENDPOINT, settable on the managed plugin) fills in a missing
    -o endpoint= at Create; the volume keeps it, and an explicit option wins."""
    bucket = rclone_server.new_bucket()
    driver = make_driver(s3_endpoint=rclone_server.endpoint)
    options = s3_options(rclone_server, bucket)
    del options["endpoint"]
    driver.create("v", options)
    assert driver.get("v").status["options"]["endpoint"] == rclone_server.endpoint
    driver.create("v", options)  # Docker's repeated Create: same options, no conflict
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "f").write_text("default endpoint")
    driver.unmount("v", ID1)
    assert rclone_server.client().head_object(Bucket=bucket, Key="f")["ContentLength"] == 16
    dead = "http://127.0.0.1:9"
    with pytest.raises(InvalidOptionError, match=re.escape(f"cannot reach S3 endpoint {dead}")):
        driver.create("w", {**options, "endpoint": dead})
    driver.close()
    # A later default does not re-point the existing volume.
    other = make_driver(s3_endpoint=dead)
    assert other.get("v").status["options"]["endpoint"] == rclone_server.endpoint


def test_mount_with_credentials_refused_fails_with_s3s_message(
    make_driver: DriverFactory, rclone_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials that worked at Create but not at Mount (rotated, revoked): the Mount call
    fails with S3's answer, and the next Mount with good credentials works."""
    bucket = rclone_server.new_bucket()
    driver = make_driver()
    driver.create("v", s3_options(rclone_server, bucket))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-away")
    with pytest.raises(MountError, match=f"cannot access s3://{bucket}"):
        driver.mount("v", ID1)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3servers.SECRET_KEY)
    mountpoint = Path(driver.mount("v", ID1))
    (mountpoint / "f").write_text("ok")
    driver.unmount("v", ID1)
    assert rclone_server.client().head_object(Bucket=bucket, Key="f")["ContentLength"] == 2
