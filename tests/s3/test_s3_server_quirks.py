"""Quirks of the loopback servers that the fast paths must survive at full speed.

moto's server (werkzeug) does not pipeline: it answers the first request of a pipelined
batch and then waits. Without a limit, a default-client copy of 30 tiny objects waited the
whole read timeout (60 s; `--s3-client boto3`: 0.5 s). rclone pipelines, and keeps doing so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import s3servers
from harness.s3servers import S3Server

from plugin.s3 import fast as s3fast
from plugin.staging.engine import CopyOptions, S3Options, copy

pytestmark = [pytest.mark.s3]

s3_server = s3servers.s3_server

TINY = 30


@pytest.fixture
def tiny_bucket(s3_server: S3Server) -> str:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    for i in range(TINY):
        client.put_object(Bucket=bucket, Key=f"in/f{i:02d}.txt", Body=b"x" * (100 + i))
    return bucket


@pytest.fixture
def fast(s3_server: S3Server, tiny_bucket: str) -> Iterator[s3fast.FastClient]:
    client = s3fast.from_boto3_client(
        s3_server.client(), tiny_bucket, connect_timeout=2, read_timeout=60
    )
    assert client is not None
    try:
        yield client
    finally:
        client.close()


def test_pipelined_gets_learn_what_the_server_does(
    s3_server: S3Server, fast: s3fast.FastClient
) -> None:
    keys = [f"in/f{i:02d}.txt" for i in range(TINY)]
    started = time.monotonic()
    first = fast.get_many(keys, 1 << 20)
    assert time.monotonic() - started < 5
    answered = [k for k, got in zip(keys, first, strict=True) if not isinstance(got, Exception)]
    if s3_server.kind == "moto":
        assert len(answered) < TINY
        assert not fast.pipelining
        # Later batches are not pipelined at all: the caller fetches them one by one.
        assert all(isinstance(got, s3fast.FastPathError) for got in fast.get_many(keys, 1 << 20))
    else:
        assert answered == keys
        assert fast.pipelining and fast.pipelining_proven
    for key, got in zip(keys, first, strict=True):
        if not isinstance(got, Exception):
            assert got[0] == 200 and got[2] == b"x" * (100 + int(key[4:6]))


def test_pipelined_heads_learn_what_the_server_does(
    s3_server: S3Server, fast: s3fast.FastClient
) -> None:
    """A guard: moto's server closes a connection after a 16-HEAD batch's first answer (no
    wait); the trial timeout covers the case where it would wait instead."""
    keys = [f"in/f{i:02d}.txt" for i in range(TINY)]
    started = time.monotonic()
    answers = fast.head_many(keys)
    assert time.monotonic() - started < 5
    assert [a[0] for a in answers if not isinstance(a, Exception)] == [200] * TINY
    assert fast.pipelining is (s3_server.kind == "rclone")


def test_default_client_copies_tiny_objects_quickly(
    s3_server: S3Server, tiny_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3servers.aws_env({}).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    result = copy(
        f"s3://{tiny_bucket}/in",
        str(tmp_path / "out"),
        CopyOptions(),
        s3=S3Options(endpoint_url=s3_server.endpoint),
    )
    elapsed = time.monotonic() - started
    assert not result.errors
    assert len(list((tmp_path / "out").iterdir())) == TINY
    assert elapsed < 10, f"{TINY} tiny objects took {elapsed:.1f} s"
