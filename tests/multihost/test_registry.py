"""Volume records shared through the registry: every host knows the same volumes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import Hosts
from harness.daemon import StowageDaemon

#: The issue's promise: a change on one host is known on every other within 2 s.
PROPAGATION_S = 2.0


def names(daemon: StowageDaemon) -> set[str]:
    return {v["Name"] for v in daemon.client().list()["Volumes"]}


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` held; fails if it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def staged(bucket: str, prefix: str = "data") -> dict[str, str]:
    url = f"s3://{bucket}/{prefix}"
    return {"stage_in": url, "stage_out": url}


def test_capabilities_say_global(hosts: Hosts) -> None:
    (a,) = hosts(1)
    assert a.client().capabilities() == {"Capabilities": {"Scope": "global"}}


def test_create_and_remove_propagate_within_2s(hosts: Hosts, moto: Any) -> None:
    a, b, c = hosts(3)
    data = moto.new_bucket()
    assert a.client().create("shared", staged(data))["Err"] == ""
    for other in (b, c):
        within(PROPAGATION_S, lambda other=other: "shared" in names(other))
    got = b.client().get("shared")["Volume"]
    assert got["Status"]["options"]["stage_in"] == f"s3://{data}/data"
    host_a = (a.root / "host-id").read_text().strip()
    assert got["Status"]["registry"]["created_on"] == host_a
    assert b.client().remove("shared")["Err"] == ""
    for other in (a, c):
        within(PROPAGATION_S, lambda other=other: "shared" not in names(other))
    assert "not found" in a.client().get("shared")["Err"]


def test_concurrent_create_of_one_name_ends_with_one_volume(hosts: Hosts, moto: Any) -> None:
    a, b, c = hosts(3)
    data = moto.new_bucket()
    replies: dict[str, dict[str, Any]] = {}
    barrier = threading.Barrier(3)

    def create(daemon: StowageDaemon, prefix: str) -> None:
        client = daemon.client()
        barrier.wait()
        replies[prefix] = client.create("race", staged(data, prefix))

    threads = [
        threading.Thread(target=create, args=(d, p))
        for d, p in ((a, "one"), (b, "two"), (c, "three"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [p for p, r in replies.items() if r["Err"] == ""]
    assert len(winners) == 1, replies
    for prefix, reply in replies.items():
        if prefix not in winners:
            assert "already exists" in reply["Err"] and "different options" in reply["Err"]
    url = f"s3://{data}/{winners[0]}"
    for daemon in (a, b, c):
        within(PROPAGATION_S, lambda d=daemon: "race" in names(d))
        opts = daemon.client().get("race")["Volume"]["Status"]["options"]
        assert opts["stage_in"] == url


def test_concurrent_create_with_same_options_is_one_volume(hosts: Hosts, moto: Any) -> None:
    a, b = hosts(2)
    opts = staged(moto.new_bucket())
    barrier = threading.Barrier(2)
    errs: list[str] = []

    def create(daemon: StowageDaemon) -> None:
        client = daemon.client()
        barrier.wait()
        errs.append(client.create("same", opts)["Err"])

    threads = [threading.Thread(target=create, args=(d,)) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errs == ["", ""]  # Docker re-sends Create: same options is a no-op everywhere
    a.client().remove("same")
    within(PROPAGATION_S, lambda: "same" not in names(b))


def test_plain_local_volumes_are_refused_with_a_registry(hosts: Hosts) -> None:
    (a,) = hosts(1)
    err = a.client().create("plain", {"uid": "1000"})["Err"]
    assert "plain local volume" in err and "backend=s3" in err
    assert "plain" not in names(a)


def test_get_and_list_answer_from_the_cache_when_s3_is_down(
    hosts: Hosts, tmp_path_factory: Any
) -> None:
    from harness import s3servers

    with s3servers.running_server("moto", tmp_path_factory.mktemp("m2")) as server:
        a, b = hosts(2, server=server)
        a.client().create("cached", staged(server.new_bucket()))
        within(PROPAGATION_S, lambda: "cached" in names(b))
        server.stop()
        time.sleep(1.0)
        assert "cached" in names(b)
        assert b.client().get("cached")["Err"] == ""
        err = b.client().create("new-one", staged("somebucket"))["Err"]
        assert err  # no Create without the registry (and here, without the bucket)
