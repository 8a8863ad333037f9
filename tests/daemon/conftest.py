from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.daemon import StowageDaemon


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short paths: a unix socket path must fit in 108 bytes.
    return Path(str(tmp_path_factory.mktemp("d", numbered=True)))


@pytest.fixture
def daemon(workdir: Path) -> Iterator[StowageDaemon]:
    if os.geteuid() != 0:
        pytest.skip("the daemon tests need root (bind mounts, chown)")
    allowed = workdir / "allowed"
    allowed.mkdir()
    proc = StowageDaemon(
        socket_path=workdir / "stowage.sock",
        root=workdir / "root",
        log_path=workdir / "stowage.log",
        allowed_paths=(allowed,),
    )
    proc.start()
    yield proc
    proc.kill()
