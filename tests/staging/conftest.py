"""Fixtures for the copy-core tier (helpers live in stagingkit.py): test credentials in the
environment, session-wide loopback S3 servers, per-test bucket names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from stagingkit import ACCESS_KEY, SECRET_KEY, S3Server, start_moto, start_rclone


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Explicit test credentials from the environment; no user config, no metadata service."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    base = tmp_path_factory.mktemp("rclone-s3")
    server = start_rclone(base / "data", base / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    base = tmp_path_factory.mktemp("moto-s3")
    server = start_moto(base / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket_name(request: pytest.FixtureRequest) -> str:
    """A bucket name unique to the test (S3 names: lowercase, digits, dashes)."""
    raw = request.node.name.lower()
    clean = "".join(c if c.isalnum() else "-" for c in raw).strip("-")
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"t-{clean[:40].strip('-')}-{digest}"
