"""Restarts of either side: Docker never re-sends Create or options (protocol.md §3.3), so
volumes, options, data and mount counts must survive in stowage's own state."""

from __future__ import annotations

import pytest
from harness.dockerd import wait_until

from e2e.helpers import E2E, Calls

pytestmark = pytest.mark.docker


def test_dockerd_restart_keeps_volume_driver_and_data(e2e: E2E, calls: Calls) -> None:
    """protocol.md §4 A11 and B19."""
    name = e2e.create_volume(e2e.unique("abc1"), mode="0770")
    first = e2e.unique("test1")
    e2e.run("--name", first, "-v", f"{name}:/foo", e2e.image, "sh", "-c", "echo hello > /foo/hello")
    e2e.docker("rm", first)
    second = e2e.unique("test2")
    e2e.docker("create", "--network", "none", "--name", second, "-v", f"{name}:/foo",
               e2e.image, "cat", "/foo/hello")  # fmt: skip
    # Running through the restart: a graceful dockerd stop stops it and sends its Unmount.
    running = e2e.unique("running")
    e2e.run("-d", "--init", "--name", running, "-v", f"{name}:/foo", e2e.image, "sleep", "600")
    calls.wait_for("Mount", 2)
    gets_while_down: list[int] = []

    e2e.dockerd.restart(while_down=lambda: gets_while_down.append(calls["Get"]))

    assert calls["Unmount"] == 2, "the graceful stop unmounted the running container's volume"
    # At boot dockerd restores its volumes with one Get each (protocol.md §3.2).
    wait_until(lambda: calls["Get"] > gets_while_down[0], 20, 0.1, "Get at dockerd boot")
    info = e2e.inspect_volume(name)
    assert info["Driver"] == e2e.driver
    assert info["Options"] == {"mode": "0770"}
    assert info["Status"]["options"] == {"mode": "0770"}
    assert info["Status"]["mounts"] == 0

    third = e2e.unique("test3")
    out = e2e.run("--name", third, "-v", f"{name}:/foo", e2e.image, "cat", "/foo/hello").stdout
    assert out == "hello\n"
    mounts = e2e.container_mounts(third)
    assert [(m["Name"], m["Driver"]) for m in mounts] == [(name, e2e.driver)]
    assert e2e.docker("start", "-a", second).stdout == "hello\n"
    assert calls["Create"] == 1, "Create must never be re-sent"


def test_stowage_sigkill_between_container_runs(e2e: E2E, calls: Calls) -> None:
    opts = {"uid": "1000", "gid": "1000", "mode": "0750"}
    managed = e2e.create_volume(e2e.unique("managed"), **opts)
    host_dir = e2e.allowed / e2e.unique("hostdir")
    host_dir.mkdir()
    hosted = e2e.create_volume(e2e.unique("hosted"), path=str(host_dir))
    e2e.run(
        "--rm", "--user", "1000:1000", "-v", f"{managed}:/m", "-v", f"{hosted}:/h", e2e.image,
        "sh", "-c", "echo m-data > /m/f",
    )  # fmt: skip
    e2e.run("--rm", "-v", f"{hosted}:/h", e2e.image, "sh", "-c", "echo h-data > /h/f")

    e2e.crash_stowage()
    e2e.stowage.start()

    listed = e2e.volumes()
    assert listed.get(managed) == e2e.driver
    assert listed.get(hosted) == e2e.driver
    info = e2e.inspect_volume(managed)
    assert info["Status"]["options"] == opts
    assert info["Status"]["mounts"] == 0
    assert e2e.inspect_volume(hosted)["Status"]["options"] == {"path": str(host_dir)}

    out = e2e.run(
        "--rm", "-v", f"{managed}:/m", "-v", f"{hosted}:/h", e2e.image,
        "sh", "-c", "cat /m/f /h/f; stat -c '%u %g %a' /m",
    ).stdout  # fmt: skip
    assert out == "m-data\nh-data\n1000 1000 750\n"
    e2e.docker("volume", "rm", managed, hosted)
    assert calls["Remove"] == 2
    assert not set(e2e.volumes()) & {managed, hosted}
    assert (host_dir / "f").read_text() == "h-data\n"


def test_stowage_sigkill_while_a_container_uses_the_volume(e2e: E2E, calls: Calls) -> None:
    """Docker never re-mounts after a plugin restart (protocol.md §3.3): the persisted mount ID
    must still be counted, and the container's later Unmount must succeed."""
    name = e2e.create_volume(e2e.unique("busy"))
    container = e2e.unique("busy-c")
    e2e.run("-d", "--name", container, "-v", f"{name}:/v", e2e.image,
            "sh", "-c", "echo ready; exec sleep 600")  # fmt: skip
    e2e.wait_for_log(container, "ready")
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 1

    e2e.crash_stowage()
    e2e.stowage.start()

    assert e2e.inspect_volume(name)["Status"]["mounts"] == 1, "mount IDs must be persisted"
    e2e.docker("exec", container, "sh", "-c", "echo after-restart > /v/f")
    e2e.docker("rm", "-f", container)
    calls.wait_for("Unmount", 1)
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 0
    out = e2e.run("--rm", "-v", f"{name}:/v", e2e.image, "cat", "/v/f").stdout
    assert out == "after-restart\n"
    e2e.docker("volume", "rm", name)
    assert name not in e2e.volumes()
