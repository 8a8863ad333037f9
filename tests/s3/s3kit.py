"""Helpers shared by the S3 backend tests (a conftest cannot be imported by name reliably)."""

from __future__ import annotations

from collections.abc import Callable

from harness.s3servers import S3Server

from plugin.driver import VolumeDriver

#: make_driver(**settings): a driver on the test's root, wired as `stowage serve` wires it.
DriverFactory = Callable[..., VolumeDriver]


def s3_options(server: S3Server, bucket: str, **extra: str) -> dict[str, str]:
    opts = {"backend": "s3", "bucket": bucket, "endpoint": server.endpoint}
    if not server.supports_dir_markers:
        opts["dir_markers"] = "false"
    opts.update(extra)
    return opts
