"""Credentials for the hand-signed client: botocore's whole chain, and static keys found
without botocore for the mount's hot path.

Building a boto3 client costs a few hundred ms of CPU (more than everything else a mount
does); the signed-request client (plugin.s3.fast) needs only keys. This finds them where the
AWS chain would find them first, for the two common cases: environment variables and a
profile with keys in the shared credentials (or config) file. Whenever the chain could go
elsewhere first (assume-role, web identity, SSO, credential_process) or the files do not
parse, it answers None and the caller asks botocore, which then gives its own error messages.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from typing import Any

Keys = tuple[str, str, str | None]


def from_botocore(credentials: Any) -> Callable[[], Keys]:
    """The keys of botocore *credentials* (its chain's answer), asked again at every call:
    role credentials (container, instance metadata, assumed roles) are refreshable objects
    that expire, never copied once."""

    def _keys() -> Keys:
        frozen = credentials.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    return _keys


#: Config-file settings that make botocore get credentials some other way than static keys.
_INDIRECT = ("role_arn", "credential_source", "source_profile", "web_identity_token_file")
_INDIRECT_PREFIXES = ("sso_", "credential_process")


def _read_ini(path: str) -> configparser.RawConfigParser | None:
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return parser  # empty: nothing there
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    return parser


def _keys(section: Mapping[str, str]) -> Keys | None:
    access = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    token = (section.get("aws_session_token") or section.get("aws_security_token") or "").strip()
    return (access, secret, token or None) if access and secret else None


def static_credentials(
    profile: str | None,
    credentials_file: str | None,
    env: Mapping[str, str] | None = None,
) -> Keys | None:
    """(access key, secret key, session token) as botocore's chain would resolve them, or
    None if only botocore can tell. Blocking (reads files)."""
    env = os.environ if env is None else env
    if profile is None:  # an explicit profile makes botocore skip the environment
        keys = _keys(
            {
                "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID", ""),
                "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY", ""),
                "aws_session_token": env.get("AWS_SESSION_TOKEN", "")
                or env.get("AWS_SECURITY_TOKEN", ""),
            }
        )
        if keys is not None:
            return keys
        if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
            return None  # half a pair: botocore's error
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_ROLE_ARN"):
        return None  # web identity comes before the shared files
    name = profile or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = env.get("HOME") or os.path.expanduser("~")
    config = _read_ini(env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"))
    if config is None:
        return None
    config_section = f"profile {name}" if name != "default" else "default"
    if not config.has_section(config_section) and name == "default":
        config_section = "profile default"
    settings: Mapping[str, str] = (
        dict(config.items(config_section)) if config.has_section(config_section) else {}
    )
    if any(k in settings for k in _INDIRECT) or any(
        k.startswith(_INDIRECT_PREFIXES) for k in settings
    ):
        return None
    shared_path = (
        credentials_file
        or env.get("AWS_SHARED_CREDENTIALS_FILE")
        or os.path.join(home, ".aws", "credentials")
    )
    shared = _read_ini(os.path.expanduser(shared_path))
    if shared is None:
        return None
    if shared.has_section(name):
        section = dict(shared.items(name))
        if any(k in section for k in _INDIRECT) or any(
            k.startswith(_INDIRECT_PREFIXES) for k in section
        ):
            return None  # botocore reads roles from this file too
        keys = _keys(section)
        if keys is not None:
            return keys
    return _keys(settings)
