"""S3 volumes: a bucket prefix served through a FUSE process (plugin.fusefs) per mounted volume.

Credentials never travel in volume options (`docker volume inspect` shows options to anyone):
they come from the daemon's environment through the standard AWS chain, or from named profiles
in the daemon's credentials file (plugin.backends.credentials) selected by `-o profile=`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugin.atomic import write_atomically
from plugin.backends import fuseproc, reach
from plugin.backends.base import Backend
from plugin.backends.credentials import CredentialsFile
from plugin.backends.fuseproc import FuseProcess, FuseStartError
from plugin.errors import BackendError, InvalidOptionError, MountError
from plugin.names import encode_name
from plugin.options import (
    OptionSpec,
    check_bucket_name,
    check_text,
    check_url,
    parse_bool,
    parse_id,
    parse_mode,
    parse_size,
)
from plugin.records import VolumeRecord
from plugin.units import parse_seconds

log = logging.getLogger(__name__)

#: How long Create waits for the FUSE launcher's imports (it never fails Create).
LAUNCHER_WAIT_S = 5.0
#: How long Mount waits for the FUSE process; under the 30 s managed-plugin client timeout.
MOUNT_TIMEOUT_S = 25.0
#: How long Unmount waits for dirty data to upload; Docker gives Unmount one minute.
UNMOUNT_TIMEOUT_S = 50.0


def _check_metadata_ttl(value: str) -> float:
    return parse_seconds(value, 0, 86400, "metadata is cached at most a day")


def _check_dir_markers(value: str) -> str:
    from plugin.s3 import markers

    return markers.check_dir_markers(value)


class S3Backend(Backend):
    kind: ClassVar[str] = "s3"
    option_specs: ClassVar[Mapping[str, OptionSpec]] = {
        spec.name: spec
        for spec in (
            OptionSpec("bucket", "bucket name (required)", check_bucket_name),
            OptionSpec(
                "prefix", "key prefix the volume is rooted at (default: the bucket)", check_text
            ),
            OptionSpec("endpoint", "S3 endpoint URL (default: AWS for the region)", check_url),
            OptionSpec("region", "S3 region", check_text),
            OptionSpec("profile", "named profile from the daemon's credentials", check_text),
            OptionSpec("uid", "owner of files without s3fs metadata", parse_id),
            OptionSpec("gid", "group of files without s3fs metadata", parse_id),
            OptionSpec("umask", "umask for files without s3fs metadata, e.g. 0022", parse_mode),
            OptionSpec("readonly", "true: mount read-only", parse_bool),
            OptionSpec(
                "dir_markers",
                "store directories as `dir/` objects: auto (default: what the server can "
                "keep, asked at create; rclone serve s3 cannot), true or false",
                _check_dir_markers,
            ),
            OptionSpec(
                "metadata_ttl",
                "seconds to cache object metadata (default 10)",
                _check_metadata_ttl,
            ),
            OptionSpec("cache_size", "data cache size cap, e.g. 2G (default 2G)", parse_size),
            OptionSpec(
                "remove_data",
                "true: `docker volume rm` also deletes every object under the prefix",
                parse_bool,
            ),
        )
    }

    def __init__(
        self,
        root: Path,
        mounts_dir: Path,
        credentials: CredentialsFile | None = None,
        defaults: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(root)
        self.defaults = dict(defaults or {})
        self.state_root = root / "s3"
        self.mounts_dir = mounts_dir
        self.credentials = credentials or CredentialsFile(root / "credentials")

    # -- paths and helpers -------------------------------------------------------------------

    def _state_dir(self, record: VolumeRecord) -> Path:
        return self.state_root / encode_name(record.name)

    def _cache_dir(self, record: VolumeRecord) -> Path:
        return self._state_dir(record) / "cache"

    def mountpoint(self, record: VolumeRecord) -> Path:
        return self.mounts_dir / encode_name(record.name)

    def _process(self, record: VolumeRecord) -> FuseProcess:
        return FuseProcess(self._state_dir(record), self.mountpoint(record))

    def _credentials(self) -> str | None:
        return self.credentials.usable()

    def with_defaults(self, options: Mapping[str, str]) -> dict[str, str]:
        return {**self.defaults, **options}

    def canonical_options(self, options: Mapping[str, str]) -> dict[str, str]:
        result = dict(options)
        if "prefix" in result:
            result["prefix"] = result["prefix"].strip("/")
        return result

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the FUSE launcher; the FUSE processes it forked keep serving their volumes."""
        fuseproc.launcher.stop()

    def housekeeping(self) -> None:
        """At daemon start (in the background): start the FUSE launcher, so that even the
        first Mount forks a process that has its imports done. Not for a daemon without S3
        volumes (it would hold the launcher's memory for nothing): then the first Mount
        starts it."""
        with contextlib.suppress(OSError):
            if any(self.state_root.iterdir()):
                fuseproc.launcher.start()

    def validate(self, name: str, options: Mapping[str, str]) -> None:
        if not options.get("bucket"):
            raise InvalidOptionError("backend=s3 needs -o bucket=NAME")
        # A Mount is likely to follow: the launcher does its imports while the bucket is
        # checked, and Create waits for the rest of them (once per daemon run, ~0.3 s), so
        # that the Mount forks at once: `docker run` pays Mount at every container start.
        fuseproc.launcher.start()
        self._check_bucket_reachable(options)
        fuseproc.launcher.wait_ready(LAUNCHER_WAIT_S)

    def _check_settings(self, options: Mapping[str, str]) -> Any:
        from plugin.s3.client import S3Settings

        return S3Settings(
            endpoint_url=options.get("endpoint"),
            region=options.get("region"),
            profile=options.get("profile"),
            credentials_file=self._credentials(),
            connect_timeout=reach.CONNECT_TIMEOUT_S,
            read_timeout=reach.READ_TIMEOUT_S,
            max_attempts=1,
        )

    def _check_bucket_reachable(self, options: Mapping[str, str]) -> None:
        reach.check_bucket_reachable(options["bucket"], options, self.credentials)

    def create(self, record: VolumeRecord) -> None:
        try:
            self._state_dir(record).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create {self._state_dir(record)}: {exc.strerror}") from exc
        from plugin.s3.markers import parse_dir_markers

        if parse_dir_markers(record.options.get("dir_markers", "auto")) is None:
            self._server_dir_markers(record)

    # -- what the server can do ----------------------------------------------------------------

    def _server_file(self, record: VolumeRecord) -> Path:
        return self._state_dir(record) / "server.json"

    def _server_dir_markers(self, record: VolumeRecord) -> bool | None:
        """`dir_markers=auto`: whether the server keeps `dir/` markers, asked once (at Create,
        else at the first Mount that can ask) and kept in the volume's state directory.
        None: unknown (the FUSE process asks at its start)."""
        from plugin.s3.client import make_s3_client
        from plugin.s3.markers import dir_markers_supported

        opts = record.options
        if parse_bool(opts.get("readonly", "false")):
            return None  # no markers are written; the probe would need write access
        path = self._server_file(record)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            known = json.loads(path.read_text())["dir_markers"]
            if isinstance(known, bool):
                return known
        try:
            client = make_s3_client(self._check_settings(opts))
            supported = dir_markers_supported(client, opts["bucket"], opts.get("prefix", ""))
        except Exception as exc:  # never fails Create: the mount asks again
            log.warning("S3 volume %r: cannot probe the server: %s", record.name, exc)
            return None
        try:
            write_atomically(path, (json.dumps({"dir_markers": supported}) + "\n").encode())
        except OSError as exc:
            log.warning("S3 volume %r: cannot record the probe in %s: %s", record.name, path, exc)
        return supported

    def _argv(self, record: VolumeRecord) -> list[str]:
        from plugin.s3.markers import parse_dir_markers

        opts = record.options
        argv = [sys.executable, "-m", "plugin.fusefs", "--bucket", opts["bucket"]]
        argv += ["--prefix", opts.get("prefix", ""), "--cache-dir", str(self._cache_dir(record))]
        for option, flag in (
            ("endpoint", "--endpoint"),
            ("region", "--region"),
            ("profile", "--profile"),
            ("uid", "--uid"),
            ("gid", "--gid"),
            ("metadata_ttl", "--metadata-ttl"),
        ):
            if option in opts:
                argv += [flag, opts[option]]
        if "umask" in opts:
            argv += ["--umask", format(parse_mode(opts["umask"]), "o")]
        markers = parse_dir_markers(opts.get("dir_markers", "auto"))
        if markers is None:
            markers = self._server_dir_markers(record)
        argv += ["--dir-markers", "auto" if markers is None else str(markers).lower()]
        if "cache_size" in opts:
            argv += ["--cache-size", str(parse_size(opts["cache_size"]))]
        if parse_bool(opts.get("readonly", "false")):
            argv.append("--readonly")
        credentials = self._credentials()
        if credentials:
            argv += ["--credentials-file", credentials]
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        return [*argv, "--log-level", level if level in ("debug", "info") else "info"]

    def mount(self, record: VolumeRecord) -> Path:
        process = self._process(record)
        if process.running() and process.state() == "mounted":
            return self.mountpoint(record)
        process.clean()  # a dead process's ENOTCONN mountpoint, a stale pid file
        try:
            process.start(self._argv(record), dict(os.environ), MOUNT_TIMEOUT_S)
        except FuseStartError as exc:
            raise MountError(f"S3 volume {record.name!r}: {exc}") from None
        except OSError as exc:
            raise MountError(f"S3 volume {record.name!r}: cannot start FUSE: {exc}") from exc
        return self.mountpoint(record)

    def unmount(self, record: VolumeRecord) -> None:
        process = self._process(record)
        process.stop(UNMOUNT_TIMEOUT_S)
        pending = self._pending_uploads(record)
        if pending:
            raise BackendError(
                f"S3 volume {record.name!r}: {pending} file(s) could not be uploaded; their "
                f"data is kept in {self._cache_dir(record)} and is retried at the next mount"
            )
        # Fails if still a mountpoint of a process we could not stop, or already gone.
        with contextlib.suppress(OSError):
            self.mountpoint(record).rmdir()

    def _pending_uploads(self, record: VolumeRecord) -> int:
        cache = self._cache_dir(record)
        return len(list(cache.glob("*.json"))) if cache.is_dir() else 0

    def remove(self, record: VolumeRecord) -> None:
        self._process(record).stop(UNMOUNT_TIMEOUT_S)
        pending = self._pending_uploads(record)
        if pending:
            raise BackendError(
                f"refusing to remove S3 volume {record.name!r}: {pending} file(s) in "
                f"{self._cache_dir(record)} were never uploaded. Mount the volume again to "
                "retry the upload, or delete that directory yourself to discard them"
            )
        if parse_bool(record.options.get("remove_data", "false")):
            self._delete_objects(record)
        shutil.rmtree(self._state_dir(record), ignore_errors=True)
        with contextlib.suppress(OSError):
            self.mountpoint(record).rmdir()

    def _delete_objects(self, record: VolumeRecord) -> None:
        from plugin.s3.client import S3Settings, make_s3_client

        opts = record.options
        client = make_s3_client(
            S3Settings(
                endpoint_url=opts.get("endpoint"),
                region=opts.get("region"),
                profile=opts.get("profile"),
                credentials_file=self._credentials(),
            )
        )
        prefix = opts.get("prefix", "")
        prefix = prefix + "/" if prefix else ""
        deleted = 0
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=opts["bucket"], Prefix=prefix
            ):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=opts["bucket"], Delete={"Objects": keys})
                    deleted += len(keys)
        except Exception as exc:
            raise BackendError(
                f"S3 volume {record.name!r}: deleting objects under "
                f"s3://{opts['bucket']}/{prefix} failed after {deleted}: {exc}"
            ) from exc
        log.info("deleted %s objects under s3://%s/%s", deleted, opts["bucket"], prefix)

    def status(self, record: VolumeRecord) -> dict[str, Any]:
        status: dict[str, Any] = {"fuse": self._process(record).state()}
        pending = self._pending_uploads(record)
        if pending:
            status["pending_uploads"] = pending
        return status

    def recover(self, record: VolumeRecord, mounted: bool) -> None:
        process = self._process(record)
        if mounted:
            if process.running() and process.state() == "mounted":
                log.info("adopted the live FUSE process of %s", record.name)
                return
            log.info("remounting %s: its FUSE process is gone", record.name)
            self.mount(record)
        elif process.recorded() is not None:
            process.stop(UNMOUNT_TIMEOUT_S)
