"""Stage-out with default options on the servers as they are: `dir_markers=auto` asks the
server at stage-out, so `rclone serve s3` gets no `dir` debris files and moto keeps empty
directories as `dir/` markers."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import s3servers
from harness.s3servers import S3Server
from s3kit import DriverFactory

from plugin.backends.local import LocalBackend
from plugin.backends.staged import jobs as staging_mod

pytestmark = [pytest.mark.s3]

s3_server = s3servers.s3_server

ID1 = "1" * 64


@pytest.fixture(autouse=True)
def fast_stage_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 0.1)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_BACKOFF_S", 0.2)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_ATTEMPTS", 2)


def keys(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.mark.parametrize("markers", ["default", "true", "false"])
def test_stage_out_dir_markers(
    make_driver: DriverFactory, s3_server: S3Server, markers: str
) -> None:
    bucket = s3_server.new_bucket()
    driver = make_driver()
    opts = {"stage_out": f"s3://{bucket}/out", "endpoint": s3_server.endpoint}
    if markers != "default":
        opts["dir_markers"] = markers
    driver.create("st", opts)
    data = Path(driver.mount("st", ID1))
    (data / "empty").mkdir()
    (data / "d" / "e").mkdir(parents=True)
    (data / "d" / "f.txt").write_text("x")
    driver.unmount("st", ID1)
    backend = driver._backends["local"]
    assert isinstance(backend, LocalBackend)
    assert backend.stager.wait_idle("st", 30)
    assert driver.get("st").status["stage_out"]["state"] == "done"
    kept = markers == "true" or (markers == "default" and s3_server.kind == "moto")
    expected = ["out/d/e/", "out/d/f.txt", "out/empty/"] if kept else ["out/d/f.txt"]
    if kept and s3_server.kind == "rclone":
        # An explicit true is honoured: rclone makes 0-byte files of the markers.
        expected = ["out/d/e", "out/d/f.txt", "out/empty"]
    assert keys(s3_server, bucket) == expected
