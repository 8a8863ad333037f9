"""Builds the driver and its backends from settings: the one place that knows them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plugin.backends import Backend, LocalBackend
from plugin.backends.credentials import CredentialsFile
from plugin.backends.s3 import S3Backend
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import PluginError
from plugin.settings import Settings

if TYPE_CHECKING:
    from plugin.metrics.serving import ServingMetrics
    from plugin.staging.stagecache import StageCache


def build_stage_cache(settings: Settings) -> StageCache | None:
    """The host-wide stage-in cache of `--stage-cache`; a directory it cannot use (another
    owner, not a directory) stops the daemon here, with the reason."""
    if settings.stage_cache is None:
        return None
    from plugin.staging.stagecache import StageCache, StageCacheError

    try:
        return StageCache(settings.stage_cache, settings.stage_cache_bytes)
    except (StageCacheError, OSError) as exc:
        raise PluginError(f"--stage-cache {settings.stage_cache}: {exc}") from None


def build_backends(settings: Settings) -> dict[str, Backend]:
    credentials = CredentialsFile(settings.credentials_path)
    backends: list[Backend] = [
        LocalBackend(
            settings.root,
            settings.allowed_paths,
            settings.mount_root,
            credentials,
            settings.s3_defaults,
            staging_jobs=settings.staging_jobs,
            stage_cache=build_stage_cache(settings),
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
    store = StateStore(settings.state_path)
    if settings.registry is None:
        return VolumeDriver(store, build_backends(settings))
    # Several hosts share their volumes (docs/several-hosts.md): imported only then.
    from plugin.registry.hostid import host_id
    from plugin.registry.shared import SharedVolumeDriver
    from plugin.registry.store import RegistryStore
    from plugin.s3 import client as s3client

    s3 = s3client.S3Settings(
        endpoint_url=settings.registry_endpoint,
        region=settings.registry_region,
        profile=settings.registry_profile,
        credentials_file=CredentialsFile(settings.credentials_path).usable(),
        connect_timeout=3.0,
        read_timeout=10.0,
        max_attempts=2,
    )
    return SharedVolumeDriver(
        store,
        build_backends(settings),
        RegistryStore(settings.registry, s3),
        host_id(settings.root),
        settings.root,
        settings.registry_lease_ttl,
    )


def build_metrics(settings: Settings, driver: VolumeDriver) -> ServingMetrics:
    """The metrics of `--metrics` (docs/metrics.md): requests, volumes, staging, FUSE, S3."""
    from plugin.metrics.serving import ServingMetrics

    metrics = ServingMetrics()
    s3 = driver.backends.get(S3Backend.kind)
    metrics.watch(driver, s3.state_root if isinstance(s3, S3Backend) else settings.root / "s3")
    metrics.s3.attach()
    return metrics
