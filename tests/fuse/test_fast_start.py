"""The mount's hot path without botocore: static credentials found as the AWS chain would
find them, and the bucket checked with one signed LIST (plugin.fusefs.__main__._fast_connect)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import s3servers
from harness.s3servers import S3Server

from plugin.s3.credentials import static_credentials

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]


def ini(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_environment_keys_come_first(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_SESSION_TOKEN": "TOK",
        "HOME": str(tmp_path),
    }
    assert static_credentials(None, None, env) == ("AK", "SK", "TOK")
    # Half a pair is botocore's to report.
    assert static_credentials(None, None, {"AWS_ACCESS_KEY_ID": "AK", "HOME": "/x"}) is None


def test_a_profile_comes_from_the_credentials_file(tmp_path: Path) -> None:
    creds = ini(
        tmp_path / "creds",
        """
        [default]
        aws_access_key_id = D1
        aws_secret_access_key = D2
        [team]
        aws_access_key_id = T1
        aws_secret_access_key = T2
        """,
    )
    env = {"AWS_ACCESS_KEY_ID": "ENV", "AWS_SECRET_ACCESS_KEY": "ENV", "HOME": str(tmp_path)}
    # An explicit profile makes botocore skip the environment, and so do we.
    assert static_credentials("team", creds, env) == ("T1", "T2", None)
    assert static_credentials(None, creds, {"HOME": str(tmp_path)}) == ("D1", "D2", None)
    assert static_credentials("missing", creds, {"HOME": str(tmp_path)}) is None


def test_anything_but_static_keys_is_left_to_botocore(tmp_path: Path) -> None:
    creds = ini(
        tmp_path / "creds",
        """
        [team]
        aws_access_key_id = T1
        aws_secret_access_key = T2
        role_arn = arn:aws:iam::1:role/x
        """,
    )
    assert static_credentials("team", creds, {"HOME": str(tmp_path)}) is None
    config = ini(tmp_path / "config", "[profile p]\ncredential_process = /bin/true\n")
    plain = ini(tmp_path / "plain", "[p]\naws_access_key_id = A\naws_secret_access_key = B\n")
    env = {"HOME": str(tmp_path), "AWS_CONFIG_FILE": config}
    assert static_credentials("p", plain, env) is None
    env = {"HOME": str(tmp_path), "AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "r"}
    assert static_credentials("p", plain, env) is None
    assert static_credentials("p", ini(tmp_path / "bad", "not an ini"), env) is None


FAST_CONNECT = """
import sys
from plugin.fusefs.__main__ import _fast_connect, parse_args
args = parse_args(sys.argv[1:])
client = _fast_connect(args)
print("fast" if client is not None else "slow", "botocore" in sys.modules)
"""


def fast_connect(server: S3Server, *extra: str, bucket: str | None = None) -> str:
    argv = ["--endpoint", server.endpoint, "--bucket", bucket or server.new_bucket(), *extra]
    p = subprocess.run(
        [sys.executable, "-c", FAST_CONNECT, *argv, "/mnt"],
        env=s3servers.aws_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return p.stdout.strip()


def test_the_bucket_check_needs_no_botocore(rclone_server: S3Server) -> None:
    assert fast_connect(rclone_server, "--dir-markers", "false") == "fast False"
    # A bucket that does not exist: the fast path steps aside so boto3 reports S3's error.
    assert fast_connect(rclone_server, "--dir-markers", "false", bucket="nope") == "slow False"
    # Probing the server for dir markers is boto3's job.
    assert fast_connect(rclone_server)[:4] == "slow"
    assert fast_connect(rclone_server, "--no-dir-markers", "--no-fast-path")[:4] == "slow"
