"""Instance-role and container credentials work everywhere S3 is used (issue 12).

Every test runs with no keys anywhere, shared files that do not exist and the metadata service
not disabled; the only credentials are those of a loopback IMDSv2 or container credentials
endpoint (credkit.MetadataServer), and the S3 server accepts only the keys it hands out. Each
test also checks that the endpoint was actually asked, so the credentials provably came from
it. Product code must neither disable a credential source nor touch the process environment:
`AWS_EC2_METADATA_DISABLED` set by the daemon for itself made botocore skip the metadata
service in every later stage-in and in every FUSE process started after it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from credkit import (
    ROLE_KEYS,
    ROTATED_KEYS,
    MetadataServer,
    RoleS3Server,
    role_only_env,
    start_s3,
)

from plugin.backends.fuseproc import FuseProcess
from plugin.backends.local import LocalBackend
from plugin.backends.staged import jobs as staging_mod
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings
from plugin.wiring import build_backends

pytestmark = pytest.mark.s3

ID1 = "1" * 64
STOWAGE = [sys.executable, "-m", "plugin"]
REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_tree(root: Path) -> None:
    """Small files and one larger than the 5 MiB chunk: a multipart upload and ranged GETs."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.txt").write_text("beta\n")
    (root / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024 + 123))


def no_metadata_switch() -> None:
    """The rule: product code never switches a credential source off for itself."""
    assert "AWS_EC2_METADATA_DISABLED" not in os.environ


# ------------------------------------------------------------------ (a) `stowage cp`


@pytest.mark.parametrize("s3_client", ["crt", "boto3"])
@pytest.mark.parametrize("source", ["imds", "container"])
def test_stowage_cp_uploads_and_downloads_with_role_credentials(
    source: str,
    s3_client: str,
    metadata: MetadataServer,
    role_s3: RoleS3Server,
    bucket_name: str,
    tmp_path: Path,
) -> None:
    """`stowage cp` both ways in a process whose only credentials are the role's. (The old
    AWS_EC2_METADATA_DISABLED write switched off only the metadata service: the container
    variants guard that path; the IMDS variants failed with "no AWS credentials found".)"""
    bucket = role_s3.new_bucket(bucket_name)
    src, down = tmp_path / "src", tmp_path / "down"
    make_tree(src)
    env = role_only_env(tmp_path, metadata.env(source))
    common = ["--endpoint", role_s3.endpoint, "--s3-client", s3_client, "--chunk-size", "5M"]

    def cp(a: str, b: str) -> None:
        done = subprocess.run(
            [*STOWAGE, "cp", "-q", *common, a, b],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr

    cp(f"{src}/", f"s3://{bucket}/up/")
    uploaded = metadata.fetches(source)
    assert uploaded >= 1, "the upload did not ask the credentials endpoint"
    assert {k: hashlib.sha256(v).hexdigest() for k, v in role_s3.objects(bucket).items()} == {
        f"up/{k}": v for k, v in tree_digest(src).items()
    }
    cp(f"s3://{bucket}/up/", f"{down}/")
    assert tree_digest(down) == tree_digest(src)
    assert metadata.fetches(source) > uploaded, "the download did not ask the endpoint"
    if source == "container":
        assert metadata.role_fetches() == 0  # the container endpoint comes first in the chain
    assert not metadata.refused, metadata.refused


# ------------------------------------------------------------------ the copy core in-process


# Refreshing is shown with container credentials: botocore refreshes both kinds the same way,
# but stretches instance-metadata credentials that expire within 12-20 minutes (its guard
# against an unavailable IMDS), so a test cannot make those due for refresh in seconds.


@pytest.mark.parametrize("s3_client", ["crt", "boto3"])
def test_expiring_role_credentials_are_refreshed_not_frozen(
    s3_client: str, container_role: MetadataServer, tmp_path: Path, bucket_name: str
) -> None:
    """A store built while the role's first keys were current signs with the keys the role
    rotated to: botocore's refreshable credentials are asked at every use (the CRT delegate,
    the hand-signed fast path), never copied once. The server knows only the new keys."""
    from plugin.staging.engine import CopyOptions, S3Options, copy, make_store

    server = start_s3(tmp_path / "s3", ROTATED_KEYS)
    try:
        bucket = server.new_bucket(bucket_name)
        make_tree(tmp_path / "src")
        # Expiring within botocore's mandatory refresh window (10 minutes): the next use of
        # these credentials must fetch new ones.
        container_role.rotate(ROLE_KEYS, timedelta(minutes=5))
        options = CopyOptions(jobs=4, chunk_size=5 * 1024 * 1024)
        s3 = S3Options(endpoint_url=server.endpoint, client=s3_client)
        store = make_store(s3, options)
        try:
            fetched = container_role.container_fetches()
            assert fetched >= 1
            container_role.rotate(ROTATED_KEYS, timedelta(hours=6))
            up = copy(f"{tmp_path / 'src'}/", f"s3://{bucket}/p/", options, store=store)
            assert not up.errors, up.errors
            down = copy(f"s3://{bucket}/p/", f"{tmp_path / 'down'}/", options, store=store)
            assert not down.errors, down.errors
        finally:
            store.close()
        assert tree_digest(tmp_path / "down") == tree_digest(tmp_path / "src")
        assert container_role.container_fetches() > fetched
        no_metadata_switch()
    finally:
        server.stop()


def test_fuse_fast_path_refreshes_role_credentials(
    container_role: MetadataServer, tmp_path: Path, bucket_name: str
) -> None:
    """The FUSE process's hand-signed client (s3fast.from_boto3_client) asks botocore's
    credentials at every request, so rotated role keys keep working."""
    from plugin.s3 import client as s3client
    from plugin.s3 import fast as s3fast

    server = start_s3(tmp_path / "s3", ROTATED_KEYS)
    try:
        bucket = server.new_bucket(bucket_name)
        server.client().put_object(Bucket=bucket, Key="k", Body=b"role data")
        container_role.rotate(ROLE_KEYS, timedelta(minutes=5))
        client = s3client.make_s3_client(s3client.S3Settings(endpoint_url=server.endpoint))
        fast = s3fast.from_boto3_client(client, bucket)
        assert fast is not None
        fetched = container_role.container_fetches()
        container_role.rotate(ROTATED_KEYS, timedelta(hours=6))
        try:
            status, _, body = fast.get_object("k", max_size=1024)
        finally:
            fast.close()
        assert (status, body) == (200, b"role data")
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"role data"
        assert container_role.container_fetches() > fetched
    finally:
        server.stop()


# ------------------------------------------------------------------ (b), (c) the daemon


@pytest.fixture
def fast_stage_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_mod, "STAGE_OUT_DELAY_S", 0.1)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_BACKOFF_S", 0.2)
    monkeypatch.setattr(staging_mod, "STAGE_OUT_ATTEMPTS", 2)


@pytest.fixture
def daemon(tmp_path: Path, fast_stage_out: None) -> Iterator[VolumeDriver]:
    """The daemon's core, wired as `stowage serve` wires it, in this process (and so with
    this process's environment, which the FUSE processes inherit)."""
    settings = Settings(root=tmp_path / "root")
    settings.root.mkdir()
    driver = VolumeDriver(StateStore(settings.state_path), build_backends(settings))
    yield driver
    s3_state = settings.root / "s3"
    for state_dir in s3_state.glob("*") if s3_state.exists() else []:
        FuseProcess(state_dir, settings.root / "mounts" / state_dir.name).stop(timeout=20)
    driver.close()


def wait_idle(driver: VolumeDriver, name: str) -> None:
    backend = driver._backends["local"]
    assert isinstance(backend, LocalBackend)
    assert backend.stager.wait_idle(name, 60), f"staging of {name} still running"


def staged_volume_round_trip(driver: VolumeDriver, server: RoleS3Server, bucket: str) -> None:
    client = server.client()
    client.put_object(Bucket=bucket, Key="in/a.txt", Body=b"alpha")
    client.put_object(Bucket=bucket, Key="in/deep/b.txt", Body=b"beta")
    driver.create(
        "staged",
        {
            "endpoint": server.endpoint,
            "dir_markers": "false",
            "stage_in": f"s3://{bucket}/in",
            "stage_out": f"s3://{bucket}/out",
        },
    )
    mountpoint = Path(driver.mount("staged", ID1))
    assert driver.get("staged").status["stage_in"]["state"] == "done"
    assert (mountpoint / "a.txt").read_bytes() == b"alpha"
    assert (mountpoint / "deep" / "b.txt").read_bytes() == b"beta"
    (mountpoint / "result.txt").write_text("computed\n")
    driver.unmount("staged", ID1)
    wait_idle(driver, "staged")
    status = driver.get("staged").status["stage_out"]
    assert status["state"] == "done", status
    assert server.objects(bucket, "out/") == {
        "out/a.txt": b"alpha",
        "out/deep/b.txt": b"beta",
        "out/result.txt": b"computed\n",
    }


def test_staged_volume_stages_in_and_out_with_role_credentials(
    role: tuple[str, MetadataServer], daemon: VolumeDriver, role_s3: RoleS3Server, bucket_name: str
) -> None:
    source, metadata = role
    bucket = role_s3.new_bucket(bucket_name)
    staged_volume_round_trip(daemon, role_s3, bucket)
    assert metadata.fetches(source) >= 3  # Create's check, stage-in, stage-out
    if source == "container":
        assert metadata.role_fetches() == 0
    no_metadata_switch()


@pytest.mark.fuse
def test_s3_volume_mounts_with_instance_role_in_a_daemon_that_stages(
    instance_role: MetadataServer,
    daemon: VolumeDriver,
    role_s3: RoleS3Server,
    bucket_name: str,
    tmp_path: Path,
) -> None:
    """A daemon that staged a volume (the S3 copy core ran in it) still starts FUSE processes
    that find the instance role: nothing switched the metadata service off in the
    environment they inherit."""
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    bucket = role_s3.new_bucket(bucket_name)
    staged_volume_round_trip(daemon, role_s3, bucket)
    role_s3.client().put_object(Bucket=bucket, Key="vol/existing.txt", Body=b"from S3")
    options = {"backend": "s3", "bucket": bucket, "endpoint": role_s3.endpoint, "prefix": "vol"}
    daemon.create("s3vol", {**options, "dir_markers": "false"})
    before_mount = instance_role.role_fetches()
    mountpoint = Path(daemon.mount("s3vol", ID1))
    assert instance_role.role_fetches() > before_mount, "the FUSE process did not ask the IMDS"
    # (The IMDS fetch is the proof: a FUSE process forked by the launcher shows the
    # launcher's start environment in /proc/PID/environ, not the one it runs with.)
    assert (mountpoint / "existing.txt").read_bytes() == b"from S3"
    (mountpoint / "written.txt").write_text("through FUSE\n")
    daemon.unmount("s3vol", ID1)
    assert role_s3.objects(bucket, "vol/") == {
        "vol/existing.txt": b"from S3",
        "vol/written.txt": b"through FUSE\n",
    }
    no_metadata_switch()
