"""Builds the driver and its backends from settings: the one place that knows them all."""

from __future__ import annotations

from plugin.backends import Backend, LocalBackend
from plugin.backends.credentials import CredentialsFile
from plugin.backends.s3 import S3Backend
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.settings import Settings


def build_backends(settings: Settings) -> dict[str, Backend]:
    credentials = CredentialsFile(settings.credentials_path)
    backends: list[Backend] = [
        LocalBackend(
            settings.root,
            settings.allowed_paths,
            settings.mount_root,
            credentials,
            settings.s3_defaults,
        ),
        S3Backend(
            settings.root,
            settings.mount_root or settings.root / "mounts",
            credentials,
            settings.s3_defaults,
        ),
    ]
    return {backend.kind: backend for backend in backends}


def build_driver(settings: Settings) -> VolumeDriver:
    settings.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return VolumeDriver(StateStore(settings.state_path), build_backends(settings))
