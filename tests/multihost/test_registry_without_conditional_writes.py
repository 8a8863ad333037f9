"""The registry on a store that ignores `If-None-Match` / `If-Match` (`rclone serve s3`): the
weaker guarantee docs/several-hosts.md states must still hold. Creates and lease writes fall
back to write, wait, read back: every host reads the same last writer, so concurrent Creates of
one name end with one volume all hosts agree on, and two hosts taking over one expired lease
end with one holder."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LEASE_TTL_S, Hosts
from harness import s3servers
from harness.daemon import StowageDaemon
from harness.plugin_client import PluginClient
from test_handover import SIZE, make_volume, stage_out_state, write_version
from test_registry import PROPAGATION_S, names, staged, within

from plugin.registry.store import RegistryStore, Stored
from plugin.s3.client import S3Settings

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3servers.S3Server]:
    with s3servers.running_server("rclone", tmp_path_factory.mktemp("rclone")) as server:
        yield server


def host_id(daemon: StowageDaemon) -> str:
    return (daemon.root / "host-id").read_text().strip()


def in_threads(calls: dict[str, Any]) -> dict[str, Any]:
    """Run every call at once (a barrier releases them together); their results by key."""
    barrier = threading.Barrier(len(calls))
    results: dict[str, Any] = {}

    def run(key: str) -> None:
        barrier.wait()
        results[key] = calls[key]()

    threads = [threading.Thread(target=run, args=(key,)) for key in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not any(t.is_alive() for t in threads)
    return results


def warmed_up(hosts: list[StowageDaemon], bucket: str) -> list[PluginClient]:
    """A client per host whose daemon has already written to the registry once: the first
    write probes for conditional writes and the first request loads code, which would
    otherwise spread a "concurrent" start over a second or more and hide the race."""
    clients = []
    for i, daemon in enumerate(hosts):
        client = daemon.client()
        assert client.create(f"warm-up-{i}", staged(bucket, f"warm-up-{i}"))["Err"] == ""
        clients.append(client)
    return clients


def two_stores(server: s3servers.S3Server, monkeypatch: pytest.MonkeyPatch) -> list[RegistryStore]:
    """Two hosts' registry stores on one registry (in this process, to control timing)."""
    for name, value in s3servers.aws_env({}).items():
        monkeypatch.setenv(name, value)
    url = f"s3://{server.new_bucket()}/registry"
    stores = [RegistryStore(url, S3Settings(endpoint_url=server.endpoint)) for _ in range(2)]
    assert not any(store.conditional for store in stores)
    return stores


def hold_first_reads(
    stores: list[RegistryStore], monkeypatch: pytest.MonkeyPatch, key_part: str
) -> None:
    """From now on, each store's first read of a key containing `key_part` returns only once
    every store has read it: all decide on the same, unchanged object, which is the race the
    read-back must settle (between daemons that window is only milliseconds wide)."""
    barrier = threading.Barrier(len(stores), timeout=30)
    for store in stores:
        real_get = store._get
        first = threading.Event()

        def get(key: str, real_get: Any = real_get, first: threading.Event = first) -> Any:
            found = real_get(key)
            if key_part in key and not first.is_set():
                first.set()
                barrier.wait()
            return found

        monkeypatch.setattr(store, "_get", get)


def test_two_creates_that_both_saw_no_record_agree_on_one_winner(
    rclone: s3servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = two_stores(rclone, monkeypatch)
    hold_first_reads(stores, monkeypatch, "volumes/race")
    docs = [{"name": "race", "host": f"host-{i}"} for i in range(len(stores))]
    results = in_threads(
        {
            str(i): lambda s=s, d=d: s.create_volume("race", d)
            for i, (s, d) in enumerate(zip(stores, docs, strict=True))
        }
    )
    winners = {stored.doc["host"] for stored in results.values()}
    assert len(winners) == 1, results
    assert stores[0].get_volume("race") == Stored(results["0"].doc, results["0"].etag)


def test_two_lease_takeovers_from_one_read_end_with_one_holder(
    rclone: s3servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = two_stores(rclone, monkeypatch)
    expired = {"holder": "dead-host", "expires": 0, "nonce": "old"}
    stores[0]._put(stores[0]._key("leases", "vol"), expired)
    read = stores[0].get_lease("vol")
    assert read is not None
    hold_first_reads(stores, monkeypatch, "leases/vol")
    results = in_threads(
        {
            str(i): lambda s=s, i=i: s.write_lease(
                "vol",
                {"holder": f"host-{i}", "expires": time.time() + 30, "nonce": f"n{i}"},
                read.etag,
            )
            for i, s in enumerate(stores)
        }
    )
    assert sorted(results.values()) == [False, True], results
    holder = stores[1].get_lease("vol")
    assert holder is not None
    assert holder.doc["holder"] == f"host-{next(k for k, v in results.items() if v)}"


def test_rclone_ignores_conditional_writes_and_the_daemon_falls_back(
    hosts: Hosts, rclone: s3servers.S3Server
) -> None:
    """The premise: a PUT with If-None-Match: * over an existing object succeeds there."""
    bucket = rclone.new_bucket()
    client = rclone.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"1")
    client.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"2"
    (a,) = hosts(1, server=rclone)
    assert a.client().create("probe", staged(rclone.new_bucket()))["Err"] == ""
    assert "conditional writes NOT supported" in a.log_text()


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_creates_of_one_name_agree_on_one_volume(
    hosts: Hosts, rclone: s3servers.S3Server, attempt: int
) -> None:
    a, b, c = hosts(3, server=rclone)
    data = rclone.new_bucket()
    clients = warmed_up([a, b, c], data)
    replies = in_threads(
        {
            prefix: lambda c=client, p=prefix: c.create("race", staged(data, p))
            for client, prefix in zip(clients, ("one", "two", "three"), strict=True)
        }
    )
    winners = [prefix for prefix, reply in replies.items() if reply["Err"] == ""]
    assert len(winners) == 1, replies
    for prefix, reply in replies.items():
        if prefix not in winners:
            assert "already exists" in reply["Err"], reply
    for daemon in (a, b, c):
        within(PROPAGATION_S, lambda d=daemon: "race" in names(d))
        options = daemon.client().get("race")["Volume"]["Status"]["options"]
        assert options["stage_in"] == f"s3://{data}/{winners[0]}"


def test_concurrent_creates_with_the_same_options_all_succeed(
    hosts: Hosts, rclone: s3servers.S3Server
) -> None:
    a, b = hosts(2, server=rclone)
    bucket = rclone.new_bucket()
    options = staged(bucket)
    clients = warmed_up([a, b], bucket)
    replies = in_threads(
        {str(i): lambda c=c: c.create("same", options) for i, c in enumerate(clients)}
    )
    assert [r["Err"] for r in replies.values()] == ["", ""]
    assert a.client().remove("same")["Err"] == ""
    within(PROPAGATION_S, lambda: "same" not in names(b))


def test_a_new_host_waits_for_the_old_hosts_stage_out(
    hosts: Hosts, rclone: s3servers.S3Server
) -> None:
    a, b = hosts(2, server=rclone)
    make_volume(a, b, rclone.new_bucket())
    mountpoint = a.client().mount("vol", "a1")["Mountpoint"]
    payload = write_version(mountpoint, b"from-a|")
    assert a.client().unmount("vol", "a1")["Err"] == ""
    reply = b.client().mount("vol", "b1")
    assert reply["Err"] == "", reply
    assert stage_out_state(a) == "done"
    assert Path(reply["Mountpoint"], "big.bin").read_bytes() == payload
    lease = b.client().get("vol")["Volume"]["Status"]["registry"]["lease"]
    assert lease["holder"] == host_id(b) and "takeover" not in lease
    assert b.client().unmount("vol", "b1")["Err"] == ""


def test_two_hosts_taking_over_a_dead_holders_lease_end_with_one_holder(
    hosts: Hosts, rclone: s3servers.S3Server
) -> None:
    a, b, c = hosts(3, server=rclone)
    bucket = rclone.new_bucket()
    url = f"s3://{bucket}/vol"
    # A short stage_timeout: the host that loses the takeover gives up within seconds.
    opts = {"stage_in": url, "stage_out": url, "stage_bwlimit": "48K", "stage_timeout": "6"}
    assert a.client().create("vol", opts)["Err"] == ""
    within(PROPAGATION_S, lambda: "vol" in names(b) and "vol" in names(c))
    write_version(a.client().mount("vol", "a1")["Mountpoint"], b"lost-on-a|")
    a.client().unmount("vol", "a1")
    within(15, lambda: stage_out_state(a) == "running")
    a.kill()
    client_b, client_c = warmed_up([b, c], bucket)
    # Both see the lease expire at about the same moment and race for it.
    time.sleep(LEASE_TTL_S + 0.5)
    replies = in_threads(
        {"b": lambda: client_b.mount("vol", "b1"), "c": lambda: client_c.mount("vol", "c1")}
    )
    winners = [key for key, reply in replies.items() if reply["Err"] == ""]
    assert len(winners) == 1, replies
    winner, loser = (b, c) if winners == ["b"] else (c, b)
    loser_reply = replies["c" if winner is b else "b"]
    assert host_id(winner) in loser_reply["Err"], loser_reply
    lease = winner.client().get("vol")["Volume"]["Status"]["registry"]["lease"]
    assert lease["holder"] == host_id(winner)
    assert host_id(a) in lease["takeover"] and "may be missing" in lease["takeover"]
    data = Path(replies["b" if winner is b else "c"]["Mountpoint"])
    big = data / "big.bin"
    assert not big.exists() or big.stat().st_size == SIZE
    assert winner.client().unmount("vol", "b1" if winner is b else "c1")["Err"] == ""
    # Released: the other host now gets it, with whatever the winner staged out.
    reply = loser.client().mount("vol", "l1")
    assert reply["Err"] == "", reply
    assert loser.client().unmount("vol", "l1")["Err"] == ""
