"""Staged volumes with the host-wide stage-in cache (`--stage-cache`), and a stage-in after
another host held the volume: what the other host deleted goes here too, unless this host
still has data of its own to upload."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.counting_proxy import counting_proxy
from stagingkit import S3Server, staged_local, wait_idle

from plugin.backends.staged import jobs as staging_mod
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

pytestmark = pytest.mark.s3

ID1 = "1" * 64


@pytest.fixture(autouse=True)
def fast_stage_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 0.1)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_BACKOFF_S", 0.2)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_ATTEMPTS", 2)


@contextlib.contextmanager
def make_driver(settings: Settings) -> Iterator[VolumeDriver]:
    settings.root.mkdir(exist_ok=True)
    driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    try:
        yield driver
    finally:
        driver.close()


def test_second_volume_is_staged_from_the_cache_without_downloading(
    tmp_path: Path, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    client = rclone_s3.client()
    blobs = {f"model/shard-{i}.bin": bytes([i]) * (300_000 + i) for i in range(3)}
    for key, body in blobs.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    settings = Settings(root=tmp_path / "root", stage_cache=tmp_path / "cache")
    with counting_proxy(rclone_s3.endpoint) as proxy, make_driver(settings) as driver:
        opts = {"endpoint": proxy.endpoint, "dir_markers": "false"}
        driver.create("first", {**opts, "stage_in": f"s3://{bucket}/model"})
        mounted = Path(driver.mount("first", ID1))
        assert (mounted / "shard-2.bin").read_bytes() == blobs["model/shard-2.bin"]
        first = driver.get("first").status["stage_in"]
        assert first["files_from_cache"] == 0 and first["state"] == "done"
        assert proxy.count("GET") >= 3  # the objects
        gets_before, lists_before = proxy.count("GET"), proxy.count("GET", listing=True)
        driver.create("second", {**opts, "stage_in": f"s3://{bucket}/model"})
        mounted = Path(driver.mount("second", ID1))
        for key, body in blobs.items():
            assert (mounted / key.split("/")[1]).read_bytes() == body
        second = driver.get("second").status["stage_in"]
        assert second["files_from_cache"] == 3, second
        assert second["bytes_from_cache"] == sum(map(len, blobs.values()))
        # No object was downloaded again; the prefix was listed.
        assert proxy.count("GET") == gets_before
        assert proxy.count("GET", listing=True) > lists_before

        # A changed object is fetched again; the others still come from the cache.
        client.put_object(Bucket=bucket, Key="model/shard-0.bin", Body=b"retrained")
        driver.create("third", {**opts, "stage_in": f"s3://{bucket}/model"})
        mounted = Path(driver.mount("third", ID1))
        assert (mounted / "shard-0.bin").read_bytes() == b"retrained"
        third = driver.get("third").status["stage_in"]
        assert third["files_from_cache"] == 2, third


def _handover_volume(driver: VolumeDriver, endpoint: str, bucket: str) -> Path:
    prefix = f"s3://{bucket}/work"
    driver.create(
        "v",
        {
            "endpoint": endpoint,
            "dir_markers": "false",
            "stage_in": prefix,
            "stage_out": prefix,
            "stage_in_policy": "always",
        },
    )
    mounted = Path(driver.mount("v", ID1))
    return mounted


def test_stage_in_after_a_handover_drops_files_the_other_host_deleted(
    tmp_path: Path, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    client = rclone_s3.client()
    client.put_object(Bucket=bucket, Key="work/keep.txt", Body=b"keep")
    client.put_object(Bucket=bucket, Key="work/old/gone.txt", Body=b"old")
    with make_driver(Settings(root=tmp_path / "root")) as driver:
        mounted = _handover_volume(driver, rclone_s3.endpoint, bucket)
        assert (mounted / "old" / "gone.txt").exists()
        driver.unmount("v", ID1)
        wait_idle(driver, "v")
        assert driver.get("v").status["stage_out"]["state"] == "done"
        # Another host held the volume meanwhile: it deleted old/ and changed keep.txt.
        client.delete_object(Bucket=bucket, Key="work/old/gone.txt")
        client.put_object(Bucket=bucket, Key="work/keep.txt", Body=b"kept, changed")
        backend = staged_local(driver)
        record = driver._record("v")
        backend.stager.force_stage_in(
            record, backend.data_path(record), backend._volume_dir(record)
        )
        mounted = Path(driver.mount("v", ID1))
        assert (mounted / "keep.txt").read_bytes() == b"kept, changed"
        assert not (mounted / "old").exists()
        assert driver.get("v").status["stage_in"]["deleted"] == 2  # old/ and old/gone.txt
        driver.unmount("v", ID1)
        wait_idle(driver, "v")


def test_stage_in_after_a_handover_keeps_files_not_yet_uploaded(
    tmp_path: Path, rclone_s3: S3Server, bucket_name: str
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    client = rclone_s3.client()
    client.put_object(Bucket=bucket, Key="work/keep.txt", Body=b"keep")
    with (
        counting_proxy(rclone_s3.endpoint) as proxy,
        make_driver(Settings(root=tmp_path / "root")) as driver,
    ):
        mounted = _handover_volume(driver, proxy.endpoint, bucket)
        (mounted / "unsaved.txt").write_text("only here")
        proxy.refuse = True  # this host's stage-out cannot reach the store
        driver.unmount("v", ID1)
        wait_idle(driver, "v")
        proxy.refuse = False
        assert driver.get("v").status["stage_out"]["state"] == "failed"
        backend = staged_local(driver)
        record = driver._record("v")
        backend.stager.force_stage_in(
            record, backend.data_path(record), backend._volume_dir(record)
        )
        mounted = Path(driver.mount("v", ID1))
        assert (mounted / "unsaved.txt").read_text() == "only here"
        assert (mounted / "keep.txt").read_bytes() == b"keep"
        assert driver.get("v").status["stage_in"]["deleted"] == 0
        driver.unmount("v", ID1)
        wait_idle(driver, "v")
