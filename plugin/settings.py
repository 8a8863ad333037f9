"""Daemon settings from command-line flags, each with an environment equivalent.

This is the only module that reads os.environ: managed plugins are configured through `Env`
entries in config.json (`docker plugin set STOWAGE_LOG_LEVEL=debug`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin import PLUGIN_NAME
from plugin.logs import FORMATS, LEVELS
from plugin.options import check_url, redact_userinfo

DEFAULT_SOCKET = Path(f"/run/docker/plugins/{PLUGIN_NAME}.sock")
DEFAULT_ROOT = Path("/var/lib/stowage")

ENV_SOCKET = "STOWAGE_SOCKET"
ENV_ROOT = "STOWAGE_ROOT"
ENV_LOG_LEVEL = "STOWAGE_LOG_LEVEL"
ENV_ALLOWED_PATHS = "STOWAGE_ALLOWED_PATHS"
ENV_MOUNT_ROOT = "STOWAGE_MOUNT_ROOT"
ENV_CREDENTIALS_FILE = "STOWAGE_CREDENTIALS_FILE"
ENV_S3_ENDPOINT = "STOWAGE_S3_ENDPOINT"
ENV_S3_REGION = "STOWAGE_S3_REGION"
ENV_REGISTRY = "STOWAGE_REGISTRY"
ENV_REGISTRY_ENDPOINT = "STOWAGE_REGISTRY_ENDPOINT"
ENV_REGISTRY_REGION = "STOWAGE_REGISTRY_REGION"
ENV_REGISTRY_PROFILE = "STOWAGE_REGISTRY_PROFILE"
ENV_REGISTRY_LEASE_TTL = "STOWAGE_REGISTRY_LEASE_TTL"
ENV_METRICS = "STOWAGE_METRICS"
ENV_LOG_FORMAT = "STOWAGE_LOG_FORMAT"
ENV_STAGE_CACHE = "STOWAGE_STAGE_CACHE"
ENV_STAGE_CACHE_SIZE = "STOWAGE_STAGE_CACHE_SIZE"
ENV_STAGING_JOBS = "STOWAGE_STAGING_JOBS"
#: Without --stage-cache-size: what a host that stages shared models or datasets can spare.
DEFAULT_STAGE_CACHE_SIZE = "20G"
DEFAULT_STAGING_JOBS = 4
#: How long a host's hold on a staged volume lasts without renewal (it renews every third).
DEFAULT_LEASE_TTL_S = 30.0


@dataclass(frozen=True)
class Settings:
    socket_path: Path = DEFAULT_SOCKET
    root: Path = DEFAULT_ROOT
    log_level: str = "info"
    allowed_paths: tuple[Path, ...] = ()
    #: Where every Mountpoint handed to Docker lies; a managed plugin's PropagatedMount.
    mount_root: Path | None = None
    #: AWS shared-credentials file with the profiles S3 volumes name; unset: <root>/credentials.
    credentials_file: Path | None = None
    #: `-o endpoint=` / `-o region=` for S3 volumes and S3 staging that do not give one.
    s3_endpoint: str | None = None
    s3_region: str | None = None
    #: s3://bucket/prefix of the registry shared by several hosts; None: this host alone.
    registry: str | None = None
    registry_endpoint: str | None = None
    registry_region: str | None = None
    registry_profile: str | None = None
    registry_lease_ttl: float = DEFAULT_LEASE_TTL_S
    #: (host, port) of the Prometheus endpoint (docs/metrics.md); None: no metrics.
    metrics: tuple[str, int] | None = None
    #: "text" or "json" (plugin.logs).
    log_format: str = "text"
    #: Directory of the host-wide stage-in cache and its bound in bytes; None: no cache.
    stage_cache: Path | None = None
    stage_cache_bytes: int = 20 * 2**30
    #: Parallel file copies of each stage-in or stage-out.
    staging_jobs: int = DEFAULT_STAGING_JOBS

    @property
    def state_path(self) -> Path:
        return self.root / "state.db"

    @property
    def credentials_path(self) -> Path:
        return self.credentials_file or self.root / "credentials"

    @property
    def s3_defaults(self) -> dict[str, str]:
        """Stored with each volume at Create, so changing a default later re-points none."""
        pairs = (("endpoint", self.s3_endpoint), ("region", self.s3_region))
        return {key: value for key, value in pairs if value}


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    """--root, shared by `serve` and the offline `volume` commands, which must agree on it."""
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get(ENV_ROOT, str(DEFAULT_ROOT))),
        help=f"directory for state and managed volume data (env {ENV_ROOT}; default %(default)s)",
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument(
        "--socket",
        type=Path,
        default=Path(env.get(ENV_SOCKET, str(DEFAULT_SOCKET))),
        help=f"unix socket to serve on; dockerd finds legacy plugins by the socket's name "
        f"under /run/docker/plugins (env {ENV_SOCKET}; default %(default)s)",
    )
    add_root_argument(parser)
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=env.get(ENV_LOG_LEVEL, "info").lower(),
        help=f"log verbosity; logs go to stdout (env {ENV_LOG_LEVEL}; default %(default)s)",
    )
    allowed_env = [Path(p) for p in env.get(ENV_ALLOWED_PATHS, "").split(os.pathsep) if p]
    parser.add_argument(
        "--allowed-path",
        dest="allowed_paths",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help=f"host directory that path= volumes may point into; repeatable "
        f"(env {ENV_ALLOWED_PATHS}, {os.pathsep!r}-separated; default: none, path= disabled)",
    )
    parser.set_defaults(allowed_paths_env=allowed_env)
    _env_argument(
        parser,
        "--mount-root",
        ENV_MOUNT_ROOT,
        "hand Docker every volume as a mount under DIR; a managed plugin sets its "
        "PropagatedMount here",
        type=Path,
        metavar="DIR",
        shown="managed local volumes are their data directory; path= and read-only binds "
        "and S3 mounts go under ROOT/mounts",
    )
    _env_argument(
        parser,
        "--credentials-file",
        ENV_CREDENTIALS_FILE,
        "AWS shared-credentials file (mode 0600) holding the profiles that S3 volumes "
        "select with -o profile=NAME",
        type=Path,
        metavar="FILE",
        shown="ROOT/credentials",
    )
    _add_endpoint_arguments(
        parser,
        "s3",
        (ENV_S3_ENDPOINT, "for volumes created without -o endpoint=", "AWS"),
        (ENV_S3_REGION, "for volumes created without -o region=", "the AWS chain's"),
    )
    _add_observability_arguments(parser)
    _add_staging_arguments(parser)
    add_registry_arguments(parser)


def _add_staging_arguments(parser: argparse.ArgumentParser) -> None:
    """--stage-cache, --stage-cache-size and --staging-jobs (README, Staged volumes)."""
    cache = "keep verified copies of staged-in S3 objects in DIR (root-only) and give later "
    cache += "volumes staging the same objects a clone of them"
    _env_argument(
        parser,
        "--stage-cache",
        ENV_STAGE_CACHE,
        cache,
        type=_stage_cache_dir,
        metavar="DIR",
        shown="none",
    )
    bound = "most the stage-in cache may hold; least recently used objects go first"
    _env_argument(
        parser,
        "--stage-cache-size",
        ENV_STAGE_CACHE_SIZE,
        bound,
        DEFAULT_STAGE_CACHE_SIZE,
        type=_stage_cache_size,
        metavar="SIZE",
    )
    _env_argument(
        parser,
        "--staging-jobs",
        ENV_STAGING_JOBS,
        "parallel file copies of each stage-in or stage-out",
        str(DEFAULT_STAGING_JOBS),
        type=_staging_jobs,
        metavar="N",
    )


def _stage_cache_dir(value: str) -> Path:
    from plugin.staging.stagecache import parse_stage_cache

    try:
        return parse_stage_cache(value, DEFAULT_STAGE_CACHE_SIZE)[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (env {ENV_STAGE_CACHE})") from None


def _stage_cache_size(value: str) -> int:
    from plugin.staging.stagecache import parse_stage_cache

    try:
        return parse_stage_cache("/", value)[1]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (env {ENV_STAGE_CACHE_SIZE})") from None


def _staging_jobs(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(
            f"--staging-jobs {value!r} (or env {ENV_STAGING_JOBS}): expected 1 to 64"
        )
    return int(value)


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared registry (docs/several-hosts.md): volumes known on every host of a Swarm."""
    env = os.environ
    parser.add_argument(
        "--registry",
        type=_registry_url,
        default=env.get(ENV_REGISTRY) or None,
        metavar="s3://BUCKET/PREFIX",
        help=f"share volume records with every stowage using the same registry (Scope global); "
        f"credentials from the daemon's usual AWS chain (env {ENV_REGISTRY}; default: none)",
    )
    _add_endpoint_arguments(
        parser,
        "registry",
        (ENV_REGISTRY_ENDPOINT, "of the registry", "AWS"),
        (ENV_REGISTRY_REGION, "of the registry", "the AWS chain's"),
    )
    parser.add_argument(
        "--registry-profile",
        default=env.get(ENV_REGISTRY_PROFILE) or None,
        metavar="NAME",
        help=f"profile for the registry from the daemon's credentials (env "
        f"{ENV_REGISTRY_PROFILE}; default: the AWS chain's)",
    )
    parser.add_argument(
        "--registry-lease-ttl",
        type=_lease_ttl,
        default=env.get(ENV_REGISTRY_LEASE_TTL) or str(DEFAULT_LEASE_TTL_S),
        metavar="SECONDS",
        help=f"how long a dead host's hold on a staged volume blocks other hosts (env "
        f"{ENV_REGISTRY_LEASE_TTL}; default %(default)s)",
    )


def _env_argument(
    parser: argparse.ArgumentParser,
    flag: str,
    env_name: str,
    meaning: str,
    default: str | None = None,
    *,
    shown: str | None = None,
    **kwargs: Any,
) -> None:
    """A flag whose default comes from `env_name`, shown in the help as `shown` (else the
    default). A string default goes through `type` too, at parse time: a bad env value is a
    usage error like a bad flag, not a traceback while the parser is built."""
    shown = shown or default
    parser.add_argument(
        flag,
        default=os.environ.get(env_name) or default,
        help=f"{meaning} (env {env_name}; default: {shown})",
        **kwargs,
    )


def _add_endpoint_arguments(
    parser: argparse.ArgumentParser,
    prefix: str,
    endpoint: tuple[str, str, str],
    region: tuple[str, str, str],
) -> None:
    """--PREFIX-endpoint and --PREFIX-region; each tuple is (env name, what for, default)."""
    env_endpoint, endpoint_for, endpoint_default = endpoint
    env_region, region_for, region_default = region
    flag = f"--{prefix}-endpoint"
    url = _endpoint_parser(flag, env_endpoint)
    meaning = f"S3 endpoint {endpoint_for}"
    _env_argument(
        parser, flag, env_endpoint, meaning, type=url, metavar="URL", shown=endpoint_default
    )
    meaning = f"S3 region {region_for}"
    _env_argument(
        parser, f"--{prefix}-region", env_region, meaning, metavar="REGION", shown=region_default
    )


def _add_observability_arguments(parser: argparse.ArgumentParser) -> None:
    """--metrics and --log-format (docs/metrics.md)."""
    metrics = "serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9479 (an "
    metrics += "empty HOST: every interface); they name volumes"
    address = parse_metrics_address
    _env_argument(
        parser, "--metrics", ENV_METRICS, metrics, type=address, metavar="HOST:PORT", shown="off"
    )
    json_lines = "text, or json: one JSON object per line with time, level, logger and message"
    _env_argument(
        parser,
        "--log-format",
        ENV_LOG_FORMAT,
        json_lines,
        "text",
        type=_log_format,
        metavar="FORMAT",
    )


def parse_metrics_address(value: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT, or :PORT for every interface) -> (host, port)."""
    where = f"metrics address {value!r} (--metrics or env {ENV_METRICS})"
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{where}: expected HOST:PORT, e.g. 127.0.0.1:9479")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise argparse.ArgumentTypeError(f"{where}: not an IPv6 address in brackets")
    elif ":" in host or not all(c.isascii() and (c.isalnum() or c in "-.") for c in host):
        raise argparse.ArgumentTypeError(
            f"{where}: HOST must be a host name or an IP address (IPv6 in brackets)"
        )
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{where}: PORT must be a number from 1 to 65535")
    return host, int(port_text)


def _log_format(value: str) -> str:
    lowered = value.lower()
    if lowered not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"log format {value!r} (--log-format or env {ENV_LOG_FORMAT}): expected "
            + " or ".join(FORMATS)
        )
    return lowered


def _registry_url(value: str) -> str:
    from plugin.options import check_bucket_name

    if not value.lower().startswith("s3://"):
        raise argparse.ArgumentTypeError(f"registry {value!r}: expected s3://bucket/prefix")
    try:
        check_bucket_name(value[5:].partition("/")[0])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"registry {value!r}: {exc}") from None
    return value


def _lease_ttl(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lease TTL {value!r}: not a number") from None
    if not 2 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"lease TTL {value!r}: expected 2 to 3600 seconds")
    return seconds


def _endpoint_parser(flag: str, env_name: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return check_url(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"S3 endpoint {redact_userinfo(value)!r} ({flag} or env {env_name}): {exc}"
            ) from None

    return parse


def settings_from_args(args: argparse.Namespace) -> Settings:
    allowed = args.allowed_paths if args.allowed_paths is not None else args.allowed_paths_env
    return Settings(
        socket_path=args.socket.absolute(),
        root=args.root.absolute(),
        log_level=args.log_level,
        allowed_paths=tuple(p.absolute() for p in allowed),
        mount_root=args.mount_root.absolute() if args.mount_root else None,
        credentials_file=args.credentials_file.absolute() if args.credentials_file else None,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        registry=getattr(args, "registry", None),
        registry_endpoint=getattr(args, "registry_endpoint", None),
        registry_region=getattr(args, "registry_region", None),
        registry_profile=getattr(args, "registry_profile", None),
        registry_lease_ttl=getattr(args, "registry_lease_ttl", DEFAULT_LEASE_TTL_S),
        metrics=getattr(args, "metrics", None),
        log_format=getattr(args, "log_format", "text"),
        stage_cache=getattr(args, "stage_cache", None),
        stage_cache_bytes=getattr(args, "stage_cache_size", Settings.stage_cache_bytes),
        staging_jobs=getattr(args, "staging_jobs", DEFAULT_STAGING_JOBS),
    )
