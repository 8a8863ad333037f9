"""Directory markers as each server has them: `dir_markers` defaults to asking the server.

`rclone serve s3` on a directory stores a PUT of `dir/` as a 0-byte file `dir`, after which
nothing can be written below `dir/`; moto (like AWS) keeps `dir/` as a marker. The probe
(`s3client.dir_markers_supported`) tells them apart, and a mount with default options
behaves on both.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fusemount import Mount, MountFactory
from harness.s3servers import S3Server

from plugin.s3 import markers as s3client

pytestmark = [pytest.mark.s3, pytest.mark.fuse]


def bucket_keys(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def default_mount(factory: MountFactory, server: S3Server, bucket: str, **kw: Any) -> Mount:
    """A mount with no dir-markers option at all, as a volume with default options."""
    return factory(server, bucket, server_default_markers=True, **kw)


@pytest.mark.parametrize("prefix", ["", "vol/a"])
def test_probe_tells_each_server_and_leaves_nothing(s3_server: S3Server, prefix: str) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    supported = s3client.dir_markers_supported(client, bucket, prefix)
    assert supported is (s3_server.kind == "moto")
    assert bucket_keys(s3_server, bucket) == []


def test_probe_cannot_tell_about_a_missing_bucket(s3_server: S3Server) -> None:
    with pytest.raises(s3client.ProbeError):
        s3client.dir_markers_supported(s3_server.client(), "no-such-bucket-here", "")


def test_option_values() -> None:
    assert s3client.parse_dir_markers("auto") is None
    assert s3client.parse_dir_markers(" AUTO ") is None
    assert s3client.parse_dir_markers("true") is True
    assert s3client.parse_dir_markers("false") is False
    with pytest.raises(ValueError):
        s3client.parse_dir_markers("sometimes")


def test_rclone_with_default_options_mkdir_mv_and_files_across_a_remount(
    mount_factory: MountFactory, rclone_server: S3Server
) -> None:
    bucket = rclone_server.new_bucket()
    m = default_mount(mount_factory, rclone_server, bucket)
    d = m.path / "d"
    os.makedirs(d / "dir")
    os.makedirs(d / "dir", exist_ok=True)  # mkdir -p of what exists
    (d / "dir" / "f.txt").write_text("one")
    os.makedirs(d / "dir" / "sub" / "deeper")
    (d / "dir" / "sub" / "deeper" / "g.txt").write_text("two")
    (d / "empty").mkdir()
    os.rename(d / "dir", d / "other")
    (d / "dir").mkdir()  # the old name is free again
    (d / "dir" / "h.txt").write_text("three")
    assert sorted(os.listdir(d)) == ["dir", "empty", "other"]
    assert m.stop() == 0
    assert "dir markers: False" in m.log()
    # No `dir` debris, no probe left behind: only the files.
    assert bucket_keys(rclone_server, bucket) == [
        "d/dir/h.txt",
        "d/other/f.txt",
        "d/other/sub/deeper/g.txt",
    ]

    m2 = default_mount(mount_factory, rclone_server, bucket)
    d = m2.path / "d"
    assert (d / "other" / "sub" / "deeper" / "g.txt").read_text() == "two"
    assert (d / "dir" / "h.txt").read_text() == "three"
    # The next container's `mkdir -p` of existing and new directories, files below them.
    os.makedirs(d / "dir", exist_ok=True)
    os.makedirs(d / "other" / "sub", exist_ok=True)
    os.makedirs(d / "new" / "x" / "y")
    (d / "new" / "x" / "y" / "z.txt").write_text("four")
    os.rename(d / "other", d / "moved")
    assert sorted(os.listdir(d)) == ["dir", "moved", "new"]
    assert m2.stop() == 0
    assert bucket_keys(rclone_server, bucket) == [
        "d/dir/h.txt",
        "d/moved/f.txt",
        "d/moved/sub/deeper/g.txt",
        "d/new/x/y/z.txt",
    ]
    data = rclone_server.workdir / "data" / bucket
    assert not [p for p in data.rglob("*") if ".stowage-probe" in p.name]


def test_default_options_keep_empty_directories_where_the_server_can(
    mount_factory: MountFactory, s3_server: S3Server
) -> None:
    markers = s3_server.kind == "moto"
    bucket = s3_server.new_bucket()
    m = default_mount(mount_factory, s3_server, bucket, prefix="p")
    (m.path / "empty").mkdir()
    (m.path / "full").mkdir()
    (m.path / "full" / "f").write_text("x")
    assert m.stop() == 0
    assert f"dir markers: {markers}" in m.log()
    expected = ["p/empty/", "p/full/", "p/full/f"] if markers else ["p/full/f"]
    assert bucket_keys(s3_server, bucket) == expected
    m2 = default_mount(mount_factory, s3_server, bucket, prefix="p")
    assert sorted(os.listdir(m2.path)) == (["empty", "full"] if markers else ["full"])


@pytest.mark.parametrize("value", ["true", "false"])
def test_explicit_dir_markers_are_honoured(
    mount_factory: MountFactory, s3_server: S3Server, value: str
) -> None:
    """An explicit value is never second-guessed: `true` writes markers even where the
    server makes files of them (rclone: a 0-byte `empty`)."""
    bucket = s3_server.new_bucket()
    m = default_mount(mount_factory, s3_server, bucket, extra=["--dir-markers", value])
    (m.path / "empty").mkdir()
    (m.path / "top.txt").write_text("x")
    assert m.stop() == 0
    assert "probe" not in m.log()
    marker = "empty/" if s3_server.kind == "moto" else "empty"
    expected = [marker, "top.txt"] if value == "true" else ["top.txt"]
    assert bucket_keys(s3_server, bucket) == expected
