"""One observation hook for every S3 request (plugin.s3.observe): the hand-signed client and
boto3 both report (operation, outcome, seconds), and an observer that fails never reaches
the request path."""

from __future__ import annotations

from collections.abc import Iterator

import botocore.exceptions
import pytest
from harness import s3servers
from harness.s3servers import S3Server

from plugin.s3 import observe
from plugin.s3.client import observe_client
from plugin.s3.errors import FastPathError
from plugin.s3.fast import FastClient, from_boto3_client

pytestmark = [pytest.mark.s3]

s3_server = s3servers.s3_server

Record = tuple[str, str, float]


@pytest.fixture
def recorded() -> Iterator[list[Record]]:
    seen: list[Record] = []
    observe.set_request_observer(lambda op, outcome, secs: seen.append((op, outcome, secs)))
    try:
        yield seen
    finally:
        observe.set_request_observer(None)


def outcomes(seen: list[Record]) -> list[tuple[str, str]]:
    assert all(0 <= secs < 60 for _, _, secs in seen)
    return [(op, outcome) for op, outcome, _ in seen]


def test_boto3_and_fast_requests_are_observed(s3_server: S3Server, recorded: list[Record]) -> None:
    bucket = s3_server.new_bucket()
    client = observe_client(s3_server.client())
    client.put_object(Bucket=bucket, Key="a", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError):
        client.head_object(Bucket=bucket, Key="missing")
    assert outcomes(recorded) == [("PutObject", "ok"), ("HeadObject", "404")]
    recorded.clear()
    fast = from_boto3_client(client, bucket, connect_timeout=2, read_timeout=30)
    assert fast is not None
    try:
        assert fast.head("a")[0] == 200
        assert fast.head("missing")[0] == 404
        fast.list_v2("", None, None, 10)
        assert fast.get_object("a", 100)[2] == b"x"
    finally:
        fast.close()
    assert outcomes(recorded) == [
        ("HeadObject", "ok"),
        ("HeadObject", "404"),
        ("ListObjectsV2", "ok"),
        ("GetObject", "ok"),
    ]


def test_a_failing_observer_never_fails_a_request(s3_server: S3Server) -> None:
    def broken(operation: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("observer bug")

    bucket = s3_server.new_bucket()
    client = observe_client(s3_server.client())
    observe.set_request_observer(broken)
    try:
        client.put_object(Bucket=bucket, Key="a", Body=b"x")
        fast = from_boto3_client(client, bucket, connect_timeout=2, read_timeout=30)
        assert fast is not None
        try:
            assert fast.head("a")[0] == 200
        finally:
            fast.close()
    finally:
        observe.set_request_observer(None)


def test_a_request_without_an_answer_is_an_error(recorded: list[Record]) -> None:
    port = s3servers.free_port()  # nothing listens there
    fast = FastClient(
        f"http://127.0.0.1:{port}", "b", "us-east-1", lambda: ("AK", "SK", None), connect_timeout=2
    )
    try:
        with pytest.raises(FastPathError):
            fast.head("k")
    finally:
        fast.close()
    assert outcomes(recorded) == [("HeadObject", "error")]
