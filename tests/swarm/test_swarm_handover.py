"""A Swarm service whose task moves to another node keeps its data, with real dockerds making
the plugin calls: a staged volume (stage_in and stage_out on one S3 prefix) is staged out by the
drained node and staged in by the next, through the shared registry and its lease; an S3
volume is the same prefix through FUSE on both nodes."""

from __future__ import annotations

import pytest
from harness.dockerd import Dockerd, wait_until
from harness.swarm_nodes import SwarmNode

from swarm.conftest import SWARM_TIMEOUT_S, Swarm

pytestmark = [pytest.mark.docker, pytest.mark.s3, pytest.mark.fuse, pytest.mark.slow]

#: The task writes these on its first start (an empty volume), then idles; TERM ends it at once.
TASK = """
trap 'exit 0' TERM
if [ ! -e /data/blob ]; then
    head -c 3000000 /dev/urandom > /data/blob.tmp && mv /data/blob.tmp /data/blob
    mkdir -p /data/dir/sub && head -c 1000 /dev/urandom > /data/dir/sub/small
fi
echo "started on $(hostname)" >> /data/starts
touch /tmp/ready
while :; do sleep 1; done
"""
#: Every file of the volume with its checksum, but `starts` (each start appends to it) and
#: stowage's copy-up marker (put in an empty staged volume while mounted, never staged out).
CHECKSUMS = (
    "cd /data && find . -type f ! -name starts ! -name .stowage-staged | sort | xargs sha256sum"
)


def node_ids(manager: Dockerd) -> dict[str, str]:
    out = manager.docker("node", "ls", "--format", "{{.Hostname}} {{.ID}}").stdout
    return dict(line.split() for line in out.splitlines())


def service_containers(node: SwarmNode, service: str) -> list[str]:
    assert node.dockerd is not None
    label = f"label=com.docker.swarm.service.name={service}"
    return node.dockerd.docker("ps", "-q", "--filter", label).stdout.split()


def running_task(node: SwarmNode, service: str) -> str | None:
    """The service's container running on `node` once its task is ready, else None."""
    assert node.dockerd is not None
    found = service_containers(node, service)
    if len(found) != 1:
        return None
    ready = node.dockerd.docker("exec", found[0], "test", "-e", "/tmp/ready", check=False)
    return found[0] if ready.returncode == 0 else None


def wait_for_task(swarm: Swarm, node: SwarmNode, service: str) -> str:
    try:
        found = wait_until(lambda: running_task(node, service), SWARM_TIMEOUT_S, 0.5, "the task")
        assert found is not None  # wait_until returns only something truthy
        return found
    except TimeoutError as exc:
        manager = swarm.manager.dockerd
        assert manager is not None
        tasks = manager.docker("service", "ps", "--no-trunc", service, check=False).stdout
        raise AssertionError(
            f"no task on node {node.index}: {exc}\n{tasks}\n{swarm.logs()}"
        ) from None


def only_schedulable(swarm: Swarm, node: SwarmNode) -> None:
    """Make `node` the one node Swarm may place tasks on (others drained: tasks move off)."""
    manager = swarm.manager.dockerd
    assert manager is not None
    ids = node_ids(manager)
    manager.docker("node", "update", "--availability", "active", ids[node.hostname])
    for other in swarm.nodes:
        if other is not node:
            manager.docker("node", "update", "--availability", "drain", ids[other.hostname])


def written_then_moved(
    swarm: Swarm, service: str, volume_opts: str, start_on: SwarmNode, move_to: SwarmNode
) -> tuple[str, str, str]:
    """Run `service` with a stowage volume on `start_on`, drain that node so the task moves to
    `move_to`; the volume's checksums before and after, and the task's start log."""
    manager = swarm.manager.dockerd
    assert manager is not None and start_on.dockerd is not None and move_to.dockerd is not None
    only_schedulable(swarm, start_on)
    mount = f"type=volume,source={service}-data,target=/data,volume-driver=stowage,{volume_opts}"
    manager.docker(
        "service", "create", "--detach", "--name", service, "--no-resolve-image",
        "--network", "host", "--stop-grace-period", "30s", "--mount", mount,
        swarm.images.busybox, "sh", "-c", TASK,
    )  # fmt: skip
    try:
        task = wait_for_task(swarm, start_on, service)
        # Written by a command after the task's own writes, just before the drain: the last
        # bytes before the move must make it too.
        start_on.dockerd.docker("exec", task, "sh", "-c", "echo late > /data/dir/late")
        written = start_on.dockerd.docker("exec", task, "sh", "-c", CHECKSUMS).stdout
        assert "./blob" in written and "./dir/late" in written

        only_schedulable(swarm, move_to)
        moved = wait_for_task(swarm, move_to, service)
        after = move_to.dockerd.docker("exec", moved, "sh", "-c", CHECKSUMS).stdout
        starts = move_to.dockerd.docker("exec", moved, "cat", "/data/starts").stdout
        assert service_containers(start_on, service) == []
        return written, after, starts
    finally:
        manager.docker("service", "rm", service, check=False)
        for node in swarm.nodes:
            wait_until(lambda n=node: not service_containers(n, service), 60, 0.5, "task gone")


def test_a_staged_volume_follows_its_task_off_a_drained_node(swarm: Swarm) -> None:
    """The drained node stages out and releases the lease; the new node's Mount waits for
    that and stages in every byte."""
    first, second = swarm.nodes
    url = f"s3://{swarm.bucket}/staged"
    opts = f"volume-opt=stage_in={url},volume-opt=stage_out={url}"
    written, after, starts = written_then_moved(swarm, "staged", opts, first, second)
    assert after == written
    assert len(starts.splitlines()) == 2, starts
    assert first.stowage is not None and second.stowage is not None
    assert first.stowage.count_requests("VolumeDriver.Unmount") >= 1
    assert second.stowage.count_requests("VolumeDriver.Mount") >= 1


def test_an_s3_volume_follows_its_task_off_a_drained_node(swarm: Swarm) -> None:
    """Through FUSE on both nodes: files closed on one are read whole on the other."""
    first, second = swarm.nodes
    opts = f"volume-opt=backend=s3,volume-opt=bucket={swarm.bucket},volume-opt=prefix=fuse"
    written, after, starts = written_then_moved(swarm, "fuse", opts, second, first)
    assert after == written
    assert len(starts.splitlines()) == 2, starts
