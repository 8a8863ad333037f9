"""S3 volumes with default options on the servers as they are: Create asks the server whether
it keeps `dir/` markers and records the answer, so no Mount needs to ask again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import s3servers
from harness.s3servers import S3Server
from s3kit import DriverFactory

from plugin.errors import InvalidOptionError

pytestmark = [pytest.mark.s3, pytest.mark.fuse]

s3_server = s3servers.s3_server

ID1 = "1" * 64
ID2 = "2" * 64


def keys(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def fuse_argv(root: Path, name: str) -> list[str]:
    # Recorded by the daemon: a process forked by the launcher shows the launcher's cmdline.
    return (root / "s3" / name / "fuse.argv").read_text().split("\0")


def test_default_volume_works_on_each_server(
    make_driver: DriverFactory, s3_server: S3Server, root: Path
) -> None:
    markers = s3_server.kind == "moto"
    bucket = s3_server.new_bucket()
    driver = make_driver()
    opts = {"backend": "s3", "bucket": bucket, "endpoint": s3_server.endpoint, "prefix": "v"}
    driver.create("data", opts)
    recorded = json.loads((root / "s3" / "data" / "server.json").read_text())
    assert recorded == {"dir_markers": markers}
    assert keys(s3_server, bucket) == []  # the probe cleaned up after itself

    mnt = Path(driver.mount("data", ID1))
    argv = fuse_argv(root, "data")
    assert argv[argv.index("--dir-markers") + 1] == str(markers).lower()
    os.makedirs(mnt / "d" / "dir")
    (mnt / "d" / "dir" / "f.txt").write_text("one")
    (mnt / "d" / "empty").mkdir()
    os.rename(mnt / "d" / "dir", mnt / "d" / "other")
    driver.unmount("data", ID1)
    expected = ["v/d/other/f.txt"]
    if markers:
        expected = sorted([*expected, "v/d/", "v/d/empty/", "v/d/other/"])
    assert keys(s3_server, bucket) == expected

    # The next container: mkdir -p of what exists, new directories, files below them.
    mnt = Path(driver.mount("data", ID2))
    os.makedirs(mnt / "d" / "other", exist_ok=True)
    os.makedirs(mnt / "d" / "dir" / "x")
    (mnt / "d" / "dir" / "x" / "g.txt").write_text("two")
    assert (mnt / "d" / "other" / "f.txt").read_text() == "one"
    driver.unmount("data", ID2)
    assert "v/d/dir/x/g.txt" in keys(s3_server, bucket)
    assert "v/d/dir" not in keys(s3_server, bucket)


def test_explicit_dir_markers_skip_the_probe(
    make_driver: DriverFactory, s3_server: S3Server, root: Path
) -> None:
    bucket = s3_server.new_bucket()
    driver = make_driver()
    for value in ("true", "false"):
        opts = {"backend": "s3", "bucket": bucket, "endpoint": s3_server.endpoint}
        driver.create(value, {**opts, "dir_markers": value})
        assert not (root / "s3" / value / "server.json").exists()
        driver.mount(value, ID1)
        argv = fuse_argv(root, value)
        assert argv[argv.index("--dir-markers") + 1] == value
        driver.unmount(value, ID1)
    with pytest.raises(InvalidOptionError, match="dir_markers"):
        driver.create("bad", {**opts, "dir_markers": "sometimes"})
