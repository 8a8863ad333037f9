"""Volume lifecycle through a real dockerd, after moby's own acceptance tests
(protocol.md §4 A, "integration-cli/docker_cli_external_volume_driver_test.go").

Mount destinations (/vol, /foo, /anon) do not exist in the busybox image, so Docker does no
copy-up and the Mount/Unmount counts are exactly those of the container runs (protocol.md §1.4).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness.dockerd import mounts_under, wait_until

from e2e.helpers import E2E, Calls, now_rfc3339

pytestmark = pytest.mark.docker

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_named_volume_lifecycle(e2e: E2E, calls: Calls) -> None:
    name = e2e.create_volume(e2e.unique("named"), mode="0770")
    assert calls["Create"] == 1

    writer = e2e.unique("writer")
    e2e.run("--name", writer, "-v", f"{name}:/vol", e2e.image, "sh", "-c", "echo hello > /vol/f")
    e2e.docker("rm", writer)
    out = e2e.run("--rm", "-v", f"{name}:/vol", e2e.image, "cat", "/vol/f").stdout
    assert out == "hello\n", "a second container must read what the first one wrote"

    assert e2e.volumes().get(name) == e2e.driver
    info = e2e.inspect_volume(name)
    assert info["Driver"] == e2e.driver
    assert info["Name"] == name
    assert info["Options"] == {"mode": "0770"}
    assert info["Scope"] == "local", "from Capabilities: a host-local volume"
    status = info["Status"]
    assert status["backend"] == "local"
    assert status["options"] == {"mode": "0770"}
    assert status["mounts"] == 0
    assert status["created_at"]
    data_dir = Path(info["Mountpoint"])
    assert (data_dir / "f").read_text() == "hello\n", "Mountpoint must be where the data is"

    calls.wait_for("Mount", 2)
    calls.wait_for("Unmount", 2)

    e2e.docker("volume", "rm", name)
    assert calls["Remove"] == 1
    assert name not in e2e.volumes()
    assert not data_dir.exists(), "Remove of a managed volume deletes its data directory"


def test_anonymous_volume_is_created_and_removed_with_the_container(e2e: E2E, calls: Calls) -> None:
    since = now_rfc3339()
    out = e2e.run(
        "--rm", "-v", "/anon", "--volume-driver", e2e.driver, e2e.image,
        "sh", "-c", "echo anon > /anon/f && cat /anon/f",
    ).stdout  # fmt: skip
    assert out == "anon\n"
    calls.wait_for("Remove", 1)
    assert (calls["Create"], calls["Mount"], calls["Unmount"]) == (1, 1, 1)

    events = e2e.volume_events(since)
    created = [
        e["Actor"]["ID"]
        for e in events
        if e["Action"] == "create" and e["Actor"]["Attributes"].get("driver") == e2e.driver
    ]
    assert len(created) == 1, events
    assert HEX64.match(created[0]), f"anonymous volume name {created[0]!r} is not 64 hex"
    destroyed = [e["Actor"]["ID"] for e in events if e["Action"] == "destroy"]
    assert created[0] in destroyed
    assert created[0] not in e2e.volumes()


def test_volumes_from_mounts_and_unmounts_twice(e2e: E2E, calls: Calls) -> None:
    """protocol.md §4 A4: creations 1, removals 1, mounts 2, unmounts 2."""
    first = e2e.unique("vol-test1")
    e2e.run(
        "--name", first, "-v", "/foo", "--volume-driver", e2e.driver, e2e.image,
        "sh", "-c", "echo shared > /foo/f",
    )  # fmt: skip
    out = e2e.run("--rm", "--volumes-from", first, e2e.image, "cat", "/foo/f").stdout
    assert out == "shared\n"
    e2e.docker("rm", "-fv", first)
    calls.wait_for("Remove", 1)
    assert calls["Create"] == 1
    calls.wait_for("Mount", 2)
    calls.wait_for("Unmount", 2)


def test_cp_from_running_container_mounts_again(e2e: E2E, calls: Calls, tmp_path: Path) -> None:
    """protocol.md §4 A18: `docker cp` mounts the same mount ID a second time."""
    name = e2e.create_volume(e2e.unique("cp"))
    container = e2e.unique("cp-c")
    e2e.run(
        "-d", "--name", container, "-v", f"{name}:/foo", e2e.image,
        "sh", "-c", "echo cp-data > /foo/test && echo ready && exec sleep 600",
    )  # fmt: skip
    e2e.wait_for_log(container, "ready")
    calls.wait_for("Mount", 1)
    assert calls["Unmount"] == 0
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 1

    e2e.docker("cp", f"{container}:/foo/test", str(tmp_path / "test"))
    assert (tmp_path / "test").read_text() == "cp-data\n"
    calls.wait_for("Mount", 2)
    calls.wait_for("Unmount", 1)
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 1, "still in use by the container"

    e2e.docker("kill", container)
    calls.wait_for("Unmount", 2)
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 0


def test_failed_mount_sends_no_unmount(e2e: E2E, calls: Calls) -> None:
    """protocol.md §4 A17: a Mount error fails `docker run` and is never followed by Unmount."""
    host_dir = e2e.allowed / e2e.unique("vanishing")
    host_dir.mkdir()
    name = e2e.create_volume(e2e.unique("gone"), path=str(host_dir))
    host_dir.rmdir()

    for extra in ((), ("-w", "/foo")):
        container = e2e.unique("fail")
        result = e2e.run(
            "--name", container, *extra, "-v", f"{name}:/foo", e2e.image, "true", check=False
        )
        assert result.returncode != 0, result.stdout
        assert str(host_dir) in result.stderr, result.stderr
        assert "VolumeDriver.Mount" in result.stderr, result.stderr
        # Removing the container is the last chance for Docker to send an Unmount.
        e2e.docker("rm", "-f", container)
    assert calls["Mount"] == 2
    assert calls["Unmount"] == 0
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 0


def test_options_reach_the_plugin_and_the_volume_root(e2e: E2E, calls: Calls) -> None:
    opts = {"uid": "1000", "gid": "1000", "mode": "0750"}
    name = e2e.create_volume(e2e.unique("opts"), **opts)
    info = e2e.inspect_volume(name)
    assert info["Options"] == opts
    assert info["Status"]["options"] == opts
    assert info["Status"]["backend"] == "local"
    out = e2e.run("--rm", "-v", f"{name}:/vol", e2e.image, "stat", "-c", "%u %g %a", "/vol")
    assert out.stdout == "1000 1000 750\n"

    # Same name again: Docker finds it with Get and never re-sends Create; -o is ignored.
    e2e.create_volume(name, mode="0700")
    assert calls["Create"] == 1
    assert e2e.inspect_volume(name)["Status"]["options"] == opts


def test_unknown_option_fails_create_naming_it(e2e: E2E) -> None:
    name = e2e.unique("bogus")
    result = e2e.docker(
        "volume", "create", "--driver", e2e.driver, "-o", "frobnicate=1", name, check=False
    )
    assert result.returncode != 0
    assert "frobnicate" in result.stderr, result.stderr
    assert name not in e2e.volumes()


def test_path_is_never_called(e2e: E2E, calls: Calls) -> None:
    """protocol.md §4 A13: Docker takes Mountpoint from Get/Mount; Path stays unused."""
    name = e2e.create_volume(e2e.unique("nopath"))
    assert name in e2e.volumes()
    e2e.inspect_volume(name)
    e2e.run("--rm", "-v", f"{name}:/vol", e2e.image, "true")
    assert calls["List"] >= 1
    assert calls["Get"] >= 1
    assert calls["Path"] == 0


def test_two_containers_share_a_volume_one_readonly(e2e: E2E, calls: Calls) -> None:
    name = e2e.create_volume(e2e.unique("shared"))
    writer, reader = e2e.unique("w"), e2e.unique("r")
    e2e.run(
        "-d", "--name", writer, "-v", f"{name}:/v", e2e.image, "sh", "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /v/n.tmp; mv /v/n.tmp /v/n; sleep 0.05; done",
    )  # fmt: skip
    e2e.run("-d", "--name", reader, "-v", f"{name}:/v:ro", e2e.image, "sleep", "600")

    def counter() -> int:
        result = e2e.docker("exec", reader, "cat", "/v/n", check=False)
        return int(result.stdout) if result.returncode == 0 and result.stdout.strip() else 0

    first = wait_until(counter, 20, 0.05, "the reader to see the writer's counter")
    wait_until(lambda: counter() > first, 20, 0.05, "the counter to advance under the reader")

    denied = e2e.docker("exec", reader, "sh", "-c", "echo x > /v/intruder", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr, denied.stderr
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 2
    assert calls["Mount"] == 2

    e2e.docker("rm", "-f", writer, reader)
    calls.wait_for("Unmount", 2)
    assert e2e.inspect_volume(name)["Status"]["mounts"] == 0
    exists = e2e.run("--rm", "-v", f"{name}:/v", e2e.image, "ls", "/v").stdout.split()
    assert "intruder" not in exists


def test_non_root_user_writes_to_volume_owned_by_its_uid(e2e: E2E) -> None:
    owned = e2e.create_volume(e2e.unique("owned"), uid="1000", gid="1000")
    out = e2e.run(
        "--rm", "--user", "1000:1000", "-v", f"{owned}:/v", e2e.image,
        "sh", "-c", "echo mine > /v/f && stat -c %u:%g /v/f && cat /v/f",
    ).stdout  # fmt: skip
    assert out == "1000:1000\nmine\n"

    # Control: without uid/gid the root-owned volume refuses uid 1000, so the options did it.
    plain = e2e.create_volume(e2e.unique("plain"))
    denied = e2e.run(
        "--rm", "--user", "1000:1000", "-v", f"{plain}:/v", e2e.image,
        "sh", "-c", "echo x > /v/f", check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr, denied.stderr


def test_readonly_volume_reads_but_never_writes(e2e: E2E, calls: Calls) -> None:
    host_dir = e2e.allowed / e2e.unique("ro")
    host_dir.mkdir()
    (host_dir / "placed.txt").write_text("placed before\n")
    name = e2e.create_volume(e2e.unique("ro"), path=str(host_dir), readonly="true")

    out = e2e.run("--rm", "-v", f"{name}:/v", e2e.image, "cat", "/v/placed.txt").stdout
    assert out == "placed before\n"
    denied = e2e.run(
        "--rm", "-v", f"{name}:/v", e2e.image, "sh", "-c", "echo x > /v/new", check=False
    )
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr, denied.stderr
    assert not (host_dir / "new").exists()

    calls.wait_for("Unmount", 2)
    assert mounts_under(e2e.stowage.root) == [], "the read-only bind must go with the last user"

    e2e.docker("volume", "rm", name)
    assert (host_dir / "placed.txt").read_text() == "placed before\n", "path= data is the user's"


def test_copy_up_seeds_an_empty_volume_and_nocopy_does_not(e2e: E2E, calls: Calls) -> None:
    """protocol.md §1.4: a destination that exists in the image is copied into a new volume,
    with its own Mount/Unmount pair at container create; `:nocopy` skips both."""
    seeded = e2e.create_volume(e2e.unique("seeded"))
    out = e2e.run("--rm", "-v", f"{seeded}:/data", e2e.images.data, "cat", e2e.images.seed_path)
    assert out.stdout == e2e.images.seed_content
    calls.wait_for("Mount", 2)
    calls.wait_for("Unmount", 2)
    again = e2e.run("--rm", "-v", f"{seeded}:/vol", e2e.image, "cat", "/vol/seed.txt").stdout
    assert again == e2e.images.seed_content, "the copied data lives in the volume"

    empty = e2e.create_volume(e2e.unique("nocopy"))
    out = e2e.run("--rm", "-v", f"{empty}:/data:nocopy", e2e.images.data, "ls", "-A", "/data")
    assert out.stdout == ""
    calls.wait_for("Mount", 4)
    calls.wait_for("Unmount", 4)


def test_volume_deleted_behind_dockers_back_can_be_recreated(e2e: E2E, calls: Calls) -> None:
    """protocol.md §4 A16: Docker checks its stale record with Get; an error there makes it
    purge the record, so the name is free again for this driver and for `local`."""
    name = e2e.create_volume(e2e.unique("oob"), mode="0700")
    client = e2e.stowage.client()
    try:
        assert not client.remove(name).get("Err")
        e2e.create_volume(name, mode="0750")
        assert calls["Create"] == 2
        info = e2e.inspect_volume(name)
        assert (info["Driver"], info["Options"]) == (e2e.driver, {"mode": "0750"})
        assert info["Status"]["options"] == {"mode": "0750"}

        assert not client.remove(name).get("Err")
        e2e.docker("volume", "create", "--driver", "local", name)
        assert e2e.inspect_volume(name)["Driver"] == "local"
        assert name not in e2e.volumes() and name in e2e.volumes("local")
    finally:
        client.close()
