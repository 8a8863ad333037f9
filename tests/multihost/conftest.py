"""Two or three `stowage serve` daemons, each with its own --root and socket, sharing one
registry on a loopback S3 server: several hosts, on one machine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import s3servers
from harness.daemon import StowageDaemon

#: Short, so the dead-host test takes seconds rather than Docker's default 30 s.
LEASE_TTL_S = 4.0

Hosts = Callable[..., list[StowageDaemon]]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3servers.S3Server]:
    with s3servers.running_server("moto", tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def hosts(moto: s3servers.S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """`hosts(n, server=moto)`: n daemons sharing a fresh registry bucket on `server`."""
    if os.geteuid() != 0:
        pytest.skip("the daemon tests need root (bind mounts, FUSE)")
    started: list[StowageDaemon] = []

    def make(n: int = 2, server: s3servers.S3Server | None = None) -> list[StowageDaemon]:
        server = server or moto
        bucket = server.new_bucket()
        out = []
        for i in range(n):
            # Short paths: a unix socket path must fit in 108 bytes.
            work = Path(str(tmp_path_factory.mktemp(f"h{i}", numbered=True)))
            daemon = StowageDaemon(
                socket_path=work / "s.sock",
                root=work / "root",
                log_path=work / "stowage.log",
                extra_args=(
                    "--registry",
                    f"s3://{bucket}/swarm",
                    "--registry-endpoint",
                    server.endpoint,
                    "--registry-lease-ttl",
                    str(LEASE_TTL_S),
                    "--s3-endpoint",
                    server.endpoint,
                ),
                env=s3servers.aws_env(),
            )
            daemon.start()
            started.append(daemon)
            out.append(daemon)
        return out

    yield make
    for daemon in started:
        daemon.kill()
        _unmount_fuse(daemon.root)


def _unmount_fuse(root: Path) -> None:
    """FUSE mounts of S3 volumes outlive a SIGKILLed daemon: detach them."""
    from plugin.backends import mounts

    base = root / "mounts"
    for mountpoint in base.glob("*") if base.exists() else []:
        try:
            if mounts.is_mountpoint(mountpoint):
                mounts.lazy_unmount(mountpoint)
        except OSError:
            pass
