"""Fixtures for the credential-chain tier (helpers live in credkit.py): a loopback metadata
service per test, an S3 server that accepts only the role's keys, and an environment in which
the standard AWS chain can find nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from credkit import (
    CHAIN_VARIABLES,
    ROLE_KEYS,
    MetadataServer,
    RoleS3Server,
    metadata_server,
    start_s3,
)


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    with metadata_server() as server:
        yield server


@pytest.fixture(scope="session")
def role_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoleS3Server]:
    server = start_s3(tmp_path_factory.mktemp("role-s3"), ROLE_KEYS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process's environment as on a host whose only credentials are a role: no keys,
    no shared files, the metadata service not disabled.

    Each variable is set before it is deleted so that monkeypatch restores its absence too:
    anything the code under test writes into os.environ is undone after the test.
    """
    for name in CHAIN_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(params=["imds", "container"])
def role(
    request: pytest.FixtureRequest,
    no_credentials: None,
    metadata: MetadataServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, MetadataServer]]:
    """(source, server): this process's AWS chain pointed at the instance metadata service
    or at the container credentials endpoint, and nothing else."""
    for name, value in metadata.env(request.param).items():
        monkeypatch.setenv(name, value)
    yield request.param, metadata
    assert not metadata.refused, f"the metadata server refused {metadata.refused}"


@pytest.fixture
def instance_role(
    no_credentials: None, metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MetadataServer]:
    """This process's AWS chain pointed at the instance metadata service only."""
    for name, value in metadata.env("imds").items():
        monkeypatch.setenv(name, value)
    yield metadata
    assert not metadata.refused, f"the metadata server refused {metadata.refused}"


@pytest.fixture
def container_role(
    no_credentials: None, metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MetadataServer]:
    """This process's AWS chain pointed at the container credentials endpoint (ECS, EKS)."""
    for name, value in metadata.env("container").items():
        monkeypatch.setenv(name, value)
    yield metadata
    assert not metadata.refused, f"the metadata server refused {metadata.refused}"


@pytest.fixture
def bucket_name(request: pytest.FixtureRequest) -> str:
    """A bucket name unique to the test (S3 names: lowercase, digits, dashes)."""
    raw = request.node.name.lower()
    clean = "".join(c if c.isalnum() else "-" for c in raw).strip("-")
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"c-{clean[:40].strip('-')}-{digest}"
