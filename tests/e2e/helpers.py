"""Helpers for the real-dockerd tier: call counters from stowage's log, and the `E2E` object
the tests drive Docker through. Kept out of conftest.py so tests can import the types.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.daemon import StowageDaemon
from harness.dockerd import DOCKERD, Dockerd, process_group_members, wait_until
from harness.images import BUSYBOX_BINARY, TestImages

log = logging.getLogger(__name__)

ENDPOINTS = (
    "Plugin.Activate",
    *(
        f"VolumeDriver.{e}"
        for e in ("Capabilities", "Create", "Remove", "Mount", "Unmount", "Path", "Get", "List")
    ),
)
# Every container gets this: the private dockerd has no bridge network.
NO_NET = ("--network", "none")


def missing_prerequisite() -> str | None:
    """Why this machine cannot run the tier, or None. Each reason names the install step."""
    if os.geteuid() != 0:
        return "the docker tier needs root (it starts dockerd and mounts filesystems)"
    if not Path(DOCKERD).is_file():
        return f"{DOCKERD} not found: apt-get install docker.io"
    tools = (
        ("docker", "docker.io"),
        ("docker-init", "docker.io"),  # `run --init`
        ("containerd", "containerd"),
        ("runc", "runc"),
    )
    for tool, package in tools:
        if shutil.which(tool) is None:
            return f"{tool} not on PATH: apt-get install {package}"
    if not BUSYBOX_BINARY.is_file():
        return f"{BUSYBOX_BINARY} not found: apt-get install busybox-static"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup: containers need cgroups"
    return None


# -- plugin call counting ---------------------------------------------------------------------


class Calls:
    """Plugin calls since this object was made, via `StowageDaemon.count_requests`.

    The plugin's log is cumulative over the session (and over stowage restarts), so each test
    compares against its own baseline, like moby's test plugin counters.
    """

    def __init__(self, stowage: StowageDaemon) -> None:
        self.stowage = stowage
        self.baseline = {e: stowage.count_requests(e) for e in ENDPOINTS}

    @staticmethod
    def _endpoint(name: str) -> str:
        return name if "." in name else f"VolumeDriver.{name}"

    def __getitem__(self, name: str) -> int:
        """`calls["Mount"]`: VolumeDriver.Mount calls since the baseline."""
        endpoint = self._endpoint(name)
        return self.stowage.count_requests(endpoint) - self.baseline[endpoint]

    def snapshot(self) -> dict[str, int]:
        """All non-zero counts since the baseline (for assertion messages)."""
        counts = {e: self[e] for e in ENDPOINTS}
        return {e: n for e, n in counts.items() if n}

    def wait_for(self, name: str, expected: int, timeout: float = 15.0) -> None:
        """Poll until `name` reached `expected`; Docker sends some calls after the CLI returns."""
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: self[name] >= expected, timeout, what=f"{name} == {expected}")
        assert self[name] == expected, f"{name}: expected {expected}, got {self.snapshot()}"


# -- the environment object the tests use ---------------------------------------------------------


@dataclass
class E2E:
    """Everything a test needs, with small helpers that keep the tests about behaviour."""

    dockerd: Dockerd
    stowage: StowageDaemon
    driver: str
    images: TestImages
    allowed: Path

    @property
    def image(self) -> str:
        return self.images.busybox

    def docker(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check, timeout=timeout)

    def run(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`docker run --network none <args>`; args hold options, image and command."""
        return self.dockerd.docker("run", *NO_NET, *args, check=check, timeout=timeout)

    @staticmethod
    def unique(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def create_volume(self, name: str, **opts: str) -> str:
        args = ["volume", "create", "--driver", self.driver]
        for key, value in opts.items():
            args += ["-o", f"{key}={value}"]
        out = self.docker(*args, name).stdout.strip()
        assert out == name, f"volume create printed {out!r}"
        return name

    def crash_stowage(self, timeout: float = 10.0) -> None:
        """SIGKILL stowage (master and worker) and wait until every process of it is gone.

        `StowageDaemon.kill()` waits for the gunicorn master only. Until the worker is dead its
        inherited listening socket still accepts connections, so a `start()` right away can
        mistake the dying worker's socket for the new daemon's; dockerd's next request then
        gets a reset and is retried with an empty body (moby/moby#39331).
        """
        assert self.stowage.proc is not None, "stowage was never started"
        pgid = self.stowage.proc.pid  # start_new_session: the master leads its own group
        self.stowage.kill()
        wait_until(
            lambda: not process_group_members(pgid), timeout, what="stowage's processes to exit"
        )

    def inspect_volume(self, name: str) -> dict[str, Any]:
        result: list[dict[str, Any]] = self.dockerd.docker_json("volume", "inspect", name)
        assert len(result) == 1, result
        return result[0]

    def volumes(self, *drivers: str) -> dict[str, str]:
        """`docker volume ls` of our driver (or `drivers`) as {name: driver}.

        Always filtered by driver: unfiltered, dockerd asks every legacy plugin on the host,
        including a user's real stowage (see the `canary` fixture).
        """
        out = self.docker(
            "volume", "ls", *driver_filters(*(drivers or (self.driver,))),
            "--format", "{{.Name}}\t{{.Driver}}",
        ).stdout  # fmt: skip
        return dict(line.split("\t", 1) for line in out.splitlines() if line)

    def container_mounts(self, container: str) -> list[dict[str, Any]]:
        out = self.docker("inspect", "--format", "{{json .Mounts}}", container).stdout
        mounts: list[dict[str, Any]] = json.loads(out)
        return mounts

    def wait_for_log(self, container: str, text: str, timeout: float = 20.0) -> str:
        """Poll `docker logs` until `text` shows up (a container signalling it is ready)."""

        def found() -> str:
            result = self.docker("logs", container, check=False)
            logs = result.stdout + result.stderr
            return logs if text in logs else ""

        return wait_until(found, timeout, interval=0.1, what=f"{text!r} in logs of {container}")

    def volume_events(self, since: str) -> list[dict[str, Any]]:
        """Volume events (create/mount/unmount/destroy) since the RFC 3339 time `since`."""
        until = datetime.now(UTC).isoformat()
        out = self.docker(
            "events", "--since", since, "--until", until,
            "--filter", "type=volume", "--format", "{{json .}}",
            timeout=30,
        ).stdout  # fmt: skip
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def now_rfc3339() -> str:
    """A `docker events --since` timestamp for "from now on"."""
    return datetime.now(UTC).isoformat()


def driver_filters(*drivers: str) -> list[str]:
    """`--filter driver=X` per driver (OR-ed by Docker); dockerd then asks only those drivers."""
    return [arg for driver in drivers for arg in ("--filter", f"driver={driver}")]


def remove_everything(dockerd: Dockerd, driver: str) -> None:
    """Remove all containers, and the volumes of `driver` and `local`, of the private daemon.

    Never an unfiltered `volume ls`: that would list (and this would then Remove) volumes of
    every legacy plugin on the host, a user's real stowage included.
    """
    containers = dockerd.docker("ps", "-aq", timeout=30).stdout.split()
    if containers:
        dockerd.docker("rm", "-fv", *containers, check=False, timeout=60)
    listing = dockerd.docker(
        "volume", "ls", "-q", *driver_filters(driver, "local"), timeout=30
    )  # fmt: skip
    volumes = listing.stdout.split()
    if volumes:
        result = dockerd.docker("volume", "rm", "-f", *volumes, check=False, timeout=60)
        if result.returncode != 0:
            log.warning("volume cleanup: %s", result.stderr.strip())
