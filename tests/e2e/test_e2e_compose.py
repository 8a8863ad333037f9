"""docker-compose with a stowage volume (protocol.md §3.1 "Compose"): the project volume is
created as `<project>_<key>` with `driver_opts`, survives `down`, and `down -v` removes it
through the plugin's Remove.

It runs examples/compose/compose.yaml, so the published example stays working. That file uses
the Compose Specification (no `version:` key), read by Debian's docker-compose 1.29 and by v2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.helpers import E2E, Calls

pytestmark = pytest.mark.docker

COMPOSE_TIMEOUT = 120.0

# The published example, run as is: the tests only choose the driver name and image.
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "compose" / "compose.yaml"


class Compose:
    """`docker-compose -p <project> -f <file>` against the private dockerd."""

    def __init__(self, e2e: E2E, binary: str, workdir: Path) -> None:
        self.e2e = e2e
        self.binary = binary
        self.project = f"stw{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.file = EXAMPLE
        self.workdir = workdir
        self.env = e2e.dockerd.env(
            {"STOWAGE_DRIVER": e2e.driver, "STOWAGE_EXAMPLE_IMAGE": e2e.image}
        )

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, "--ansi", "never", "-p", self.project, "-f", str(self.file), *args]
        result = subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}"
            )
        return result

    def up_and_wait(self, service: str) -> str:
        """`up -d` a fresh container of `service`, wait for it to exit 0, return its output.

        Not `docker-compose run`: 1.x can start a one-off container twice or lose its output
        when it exits at once (its attach races with the start). `docker wait` and `docker logs`
        have no such race.
        """
        self("up", "-d", "--force-recreate", "--no-deps", service)
        container = self("ps", "-q", service).stdout.strip()
        assert container, f"no container for service {service}"
        code = self.e2e.docker("wait", container).stdout.strip()
        output = self.e2e.docker("logs", container).stdout
        assert code == "0", f"{service} exited {code}: {output}"
        return output

    @property
    def volume(self) -> str:
        return f"{self.project}_store"


@pytest.fixture
def compose(e2e: E2E, tmp_path: Path) -> Iterator[Compose]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not found: apt-get install docker-compose")
    project = Compose(e2e, binary, tmp_path)
    yield project
    project("down", "-v", "--remove-orphans", check=False)


def test_compose_volume_with_driver_opts_survives_down_until_down_v(
    e2e: E2E, calls: Calls, compose: Compose
) -> None:
    compose.up_and_wait("writer")
    assert e2e.volumes().get(compose.volume) == e2e.driver
    info = e2e.inspect_volume(compose.volume)
    opts = {"uid": "1000", "gid": "1000", "mode": "0750"}
    assert info["Options"] == opts
    assert info["Status"]["options"] == opts
    assert calls["Create"] == 1

    assert compose.up_and_wait("reader").splitlines() == ["compose-data", "1000 1000 750"]

    compose("down")
    assert compose.volume in e2e.volumes(), "`down` without -v keeps the volume"
    assert calls["Remove"] == 0
    assert compose.up_and_wait("reader").startswith("compose-data\n"), "and its data"

    data_dir = Path(e2e.inspect_volume(compose.volume)["Mountpoint"])
    assert (data_dir / "out.txt").is_file()
    compose("down", "-v")
    calls.wait_for("Remove", 1)
    assert compose.volume not in e2e.volumes()
    assert not data_dir.exists(), "`down -v` reaches Remove, which deletes the data"
    assert calls["Create"] == 1
