"""HEAD, LIST and small PUTs sent from the FUSE process's trio loop (plugin.fusefs.loopio).

They must answer exactly as the worker-thread path does (same checks, same objects stored),
survive a server that closed an idle connection, notice a server that does not pipeline, and
take no worker thread at all for a create's LOOKUP and PUT.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

trio = pytest.importorskip("trio")

from harness.counting_proxy import CountingProxy, counting_proxy  # noqa: E402
from harness.s3servers import S3Server, running_server  # noqa: E402

from plugin.fusefs.loopio import LOOP_PUT_MAX, LoopRequests  # noqa: E402
from plugin.s3.errors import FastPathError  # noqa: E402
from plugin.s3.fast import FastClient, from_boto3_client  # noqa: E402


@pytest.fixture
def proxied(rclone_server: S3Server) -> Iterator[tuple[str, FastClient, CountingProxy]]:
    bucket = rclone_server.new_bucket()
    s3 = rclone_server.client()
    s3.put_object(Bucket=bucket, Key="a/file", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="a/dir/x", Body=b"")
    with counting_proxy(rclone_server.endpoint) as proxy:
        fast = from_boto3_client(rclone_server.client(endpoint_url=proxy.endpoint), bucket)
        assert fast is not None
        try:
            yield bucket, fast, proxy
        finally:
            fast.close()


def _listed(listed: dict[str, Any] | None) -> list[str]:
    assert listed is not None
    return [p["Prefix"] for p in listed.get("CommonPrefixes", [])] + [
        o["Key"] for o in listed.get("Contents", [])
    ]


@pytest.mark.parametrize("together", [False, True])
def test_loop_answers_like_the_thread_path(
    proxied: tuple[str, FastClient, CountingProxy], together: bool
) -> None:
    _bucket, fast, _proxy = proxied
    loop = LoopRequests(fast)

    async def run() -> None:
        with trio.fail_after(20):
            for _ in range(2):  # the second round on kept-alive connections
                for key in ("a/file", "a/dir", "a/none"):
                    got = await loop.head_then_list(key, key + "/", together=together)
                    want = fast.head_then_list(key, key + "/", together=together)
                    assert got[0][0] == want[0][0]
                    assert got[0][1].get("etag") == want[0][1].get("etag")
                    assert (got[1] is None) == (want[1] is None)
                    if got[1] is not None:
                        assert _listed(got[1]) == _listed(want[1])
            await loop.aclose()

    trio.run(run)


def test_loop_put_stores_the_object_with_its_metadata(
    proxied: tuple[str, FastClient, CountingProxy], rclone_server: S3Server
) -> None:
    bucket, fast, proxy = proxied
    loop = LoopRequests(fast)
    body = os.urandom(100_000)

    async def run() -> str:
        with trio.fail_after(20):
            etag = await loop.put_object("p/obj", body, [("x-amz-meta-mode", "33188")])
            with pytest.raises(FastPathError):
                await loop.put_object("p/big", bytes(LOOP_PUT_MAX + 1), [])
            await loop.aclose()
            return etag

    etag = trio.run(run)
    got = rclone_server.client().get_object(Bucket=bucket, Key="p/obj")
    assert got["Body"].read() == body
    assert {k.lower(): v for k, v in got["Metadata"].items()} == {"mode": "33188"}
    assert etag.strip('"') == got["ETag"].strip('"')
    assert proxy.count("PUT", f"/{bucket}/p/big") == 0


def test_an_idle_connection_the_server_closed_is_retried_fresh(
    proxied: tuple[str, FastClient, CountingProxy],
) -> None:
    bucket, fast, proxy = proxied
    loop = LoopRequests(fast)

    async def run() -> None:
        with trio.fail_after(20):
            await loop.head_then_list("a/file", "a/file/", together=False)
            proxy._cut_all()  # the server side of the kept-alive connection goes away
            (status, _), listed = await loop.head_then_list("a/file", "a/file/", together=False)
            assert status == 200 and listed is None
            await loop.aclose()

    trio.run(run)
    assert proxy.count("HEAD", f"/{bucket}/a/file") >= 2


def test_a_server_that_does_not_pipeline_is_noticed(tmp_path: Path) -> None:
    """moto's server answers only the first of pipelined requests: the loop gives up after
    the trial time, switches pipelining off for the fast client, and asks one by one."""
    with running_server("moto", tmp_path / "moto") as moto:
        bucket = moto.new_bucket()
        moto.client().put_object(Bucket=bucket, Key="f", Body=b"x")
        fast = from_boto3_client(moto.client(), bucket)
        assert fast is not None
        _pipelining_noticed(fast)


def _pipelining_noticed(fast: FastClient) -> None:
    loop = LoopRequests(fast)

    async def run() -> None:
        with trio.fail_after(30):
            with pytest.raises(FastPathError):
                await loop.head_then_list("none", "none/", together=True)
            assert not fast.pipelining
            (status, _), listed = await loop.head_then_list("none", "none/", together=True)
            assert status == 404 and _listed(listed) == []
            (status, _), listed = await loop.head_then_list("f", "f/", together=True)
            assert status == 200 and listed is None
            await loop.aclose()

    try:
        trio.run(run)
    finally:
        fast.close()
