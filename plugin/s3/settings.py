"""Where and how to reach S3: the settings every client and store of plugin.s3 is built
from. No boto3 here, so the stores that import boto3 only when they fall back to it can
take these settings too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Settings:
    """Where and how to connect. Secrets are deliberately not part of this."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: str | None = None
    #: Seconds to wait for a TCP connection; loopback and LAN endpoints answer in milliseconds.
    connect_timeout: float = 5.0
    #: Seconds without a byte on an open connection before botocore gives up on it.
    read_timeout: float = 60.0
    #: Total attempts per request (botocore "standard" mode, with backoff and jitter).
    max_attempts: int = 3
    #: Must cover FUSE worker concurrency plus parallel multipart parts, or requests queue.
    max_pool_connections: int = 32
    #: Path-style URLs work with every S3-compatible server; virtual-host needs DNS.
    path_style: bool = True
    #: CA bundle for TLS endpoints (from plugin.settings); None: botocore's own choice.
    ca_bundle: str | None = None
