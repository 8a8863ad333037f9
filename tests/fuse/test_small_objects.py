"""Small objects (plugin.fusefs.smallfiles): read whole in one GET straight to the reply,
and fetched ahead, headers included, when a directory is read in name order, so their
LOOKUPs need no HEAD and their READs no GET of their own. Requests are counted by a proxy
between the mount and the server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from fusemount import Mount, MountFactory
from harness.counting_proxy import CountingProxy, Proxied, counting_proxy
from harness.s3servers import S3Server

from plugin.fusefs.smallfiles import IN_ORDER_READS, PREFETCH_AHEAD

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

#: Long enough that nothing fetched ahead expires during a test.
TTL = ["--metadata-ttl", "60"]


@pytest.fixture
def proxy(rclone_server: S3Server) -> Iterator[CountingProxy]:
    with counting_proxy(rclone_server.endpoint) as p:
        yield p


def mount_through(
    mount_factory: MountFactory, proxy: CountingProxy, server: S3Server, bucket: str
) -> Mount:
    target = Proxied(proxy.endpoint, server)
    return mount_factory(cast(S3Server, target), bucket, extra=TTL)


def test_a_small_object_is_read_whole_in_one_get_without_the_cache_file(
    mount_factory: MountFactory, rclone_server: S3Server, proxy: CountingProxy, tmp_path: Path
) -> None:
    bucket = rclone_server.new_bucket()
    body = os.urandom(64 * 1024)
    rclone_server.client().put_object(Bucket=bucket, Key="one", Body=body)
    m = mount_through(mount_factory, proxy, rclone_server, bucket)
    with open(m.path / "one", "rb") as f:
        assert f.read() == body
        # The open file's cache file holds none of its bytes: the reply came from the GET.
        data_files = list((tmp_path / "work0").rglob("*.data"))
        assert data_files, "the open file should have a (sparse) cache file"
        assert all(p.stat().st_blocks == 0 for p in data_files)
    assert proxy.count("GET", f"/{bucket}/one") == 1
    assert m.stop() == 0


def test_a_directory_read_in_order_is_fetched_ahead_without_heads(
    mount_factory: MountFactory, rclone_server: S3Server, proxy: CountingProxy
) -> None:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client()
    n = PREFETCH_AHEAD + 8
    bodies = {f"f{i:03d}": os.urandom(16 * 1024) for i in range(n)}
    for name, body in bodies.items():
        client.put_object(Bucket=bucket, Key=f"d/{name}", Body=body)
    m = mount_through(mount_factory, proxy, rclone_server, bucket)
    names = sorted(bodies)
    for name in names[:IN_ORDER_READS]:
        assert (m.path / "d" / name).read_bytes() == bodies[name]
    ahead = names[IN_ORDER_READS : IN_ORDER_READS + PREFETCH_AHEAD]
    # Reading in name order started fetching the next objects of the listing.
    proxy.wait_for(lambda: all(proxy.count("GET", f"/{bucket}/d/{k}") for k in ahead))
    for name in names[IN_ORDER_READS:]:
        assert (m.path / "d" / name).read_bytes() == bodies[name]
    for name in ahead:
        path = f"/{bucket}/d/{name}"
        assert proxy.count("HEAD", path) == 0, f"{name}: LOOKUP asked the server"
        assert proxy.count("GET", path) == 1, f"{name}: READ fetched it again"
    assert m.stop() == 0


def test_a_file_written_here_is_not_served_from_what_was_fetched_ahead(
    mount_factory: MountFactory, rclone_server: S3Server, proxy: CountingProxy
) -> None:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client()
    names = [f"f{i:02d}" for i in range(8)]
    for name in names:
        client.put_object(Bucket=bucket, Key=f"d/{name}", Body=b"old " + name.encode())
    m = mount_through(mount_factory, proxy, rclone_server, bucket)
    for name in names[:IN_ORDER_READS]:
        (m.path / "d" / name).read_bytes()
    proxy.wait_for(lambda: proxy.count("GET", f"/{bucket}/d/f07") == 1)
    (m.path / "d" / "f05").write_bytes(b"new content")
    assert (m.path / "d" / "f05").read_bytes() == b"new content"
    (m.path / "d" / "f06").unlink()
    assert not (m.path / "d" / "f06").exists()
    assert (m.path / "d" / "f07").read_bytes() == b"old f07"
    assert m.stop() == 0
    assert client.get_object(Bucket=bucket, Key="d/f05")["Body"].read() == b"new content"
