"""Staged volumes (stage_in and stage_out on one prefix) move from host to host: one host at a
time holds a lease, and a new host's Mount waits until the old host uploaded its changes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from conftest import LEASE_TTL_S, Hosts
from harness.daemon import StowageDaemon
from test_registry import PROPAGATION_S, names, within

SIZE = 256 * 1024
#: Slow enough that stage-out of SIZE bytes takes seconds, so the other host's Mount overlaps.
BWLIMIT = "48K"


def make_volume(a: StowageDaemon, b: StowageDaemon, bucket: str) -> None:
    url = f"s3://{bucket}/vol"
    opts = {"stage_in": url, "stage_out": url, "stage_bwlimit": BWLIMIT, "stage_timeout": "110"}
    assert a.client().create("vol", opts)["Err"] == ""
    within(PROPAGATION_S, lambda: "vol" in names(b))


def write_version(mountpoint: str, version: bytes) -> bytes:
    payload = (version * (SIZE // len(version) + 1))[:SIZE]
    Path(mountpoint, "big.bin").write_bytes(payload)
    Path(mountpoint, "version").write_bytes(version)
    return payload


def stage_out_state(daemon: StowageDaemon) -> str:
    status = daemon.client().get("vol")["Volume"]["Status"]
    return str(status["stage_out"]["state"])


def mount_in_thread(
    daemon: StowageDaemon, mount_id: str
) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        out["reply"] = daemon.client().mount("vol", mount_id)
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_mount_on_a_new_host_waits_for_the_old_hosts_stage_out(hosts: Hosts, moto: Any) -> None:
    a, b = hosts(2)
    make_volume(a, b, moto.new_bucket())
    mp_a = a.client().mount("vol", "a1")["Mountpoint"]
    payload = write_version(mp_a, b"v2-from-a|")
    assert a.client().unmount("vol", "a1")["Err"] == ""
    started = time.monotonic()
    thread, out = mount_in_thread(b, "b1")
    thread.join(120)
    reply = out["reply"]
    assert reply["Err"] == "", reply
    # B's Mount returned only once A's upload was complete: A reports it done by now, and B
    # holds every byte A wrote (stale or partial data would differ).
    assert stage_out_state(a) == "done"
    assert out["at"] - started > 2.0  # it did wait (A's stage-out takes several seconds)
    assert Path(reply["Mountpoint"], "big.bin").read_bytes() == payload
    assert Path(reply["Mountpoint"], "version").read_bytes() == b"v2-from-a|"
    lease = b.client().get("vol")["Volume"]["Status"]["registry"]["lease"]
    assert lease["holder"] == (b.root / "host-id").read_text().strip()
    assert "takeover" not in lease

    # And back: B's changes reach A, whose own copy is older (no stale data served).
    payload = write_version(reply["Mountpoint"], b"v3-from-b|")
    assert b.client().unmount("vol", "b1")["Err"] == ""
    reply = a.client().mount("vol", "a2")
    assert reply["Err"] == "", reply
    assert Path(reply["Mountpoint"], "big.bin").read_bytes() == payload
    assert Path(reply["Mountpoint"], "version").read_bytes() == b"v3-from-b|"
    a.client().unmount("vol", "a2")


def test_a_dead_holder_is_taken_over_after_its_lease_expires(hosts: Hosts, moto: Any) -> None:
    a, b = hosts(2)
    make_volume(a, b, moto.new_bucket())
    host_a = (a.root / "host-id").read_text().strip()
    mp_a = a.client().mount("vol", "a1")["Mountpoint"]
    write_version(mp_a, b"lost-on-a|")
    a.client().unmount("vol", "a1")
    within(15, lambda: stage_out_state(a) == "running")
    a.kill()  # SIGKILL in the middle of the upload
    killed = time.monotonic()

    reply = b.client().mount("vol", "b1")
    waited = time.monotonic() - killed
    assert reply["Err"] == "", reply
    assert waited < LEASE_TTL_S + 10
    status = b.client().get("vol")["Volume"]["Status"]
    takeover = status["registry"]["lease"]["takeover"]
    assert host_a in takeover and "may be missing" in takeover
    # Whatever B serves came whole from S3: never a half-uploaded object.
    data = Path(reply["Mountpoint"])
    for entry in os.listdir(data):
        if entry == "big.bin":
            assert (data / entry).stat().st_size == SIZE
    b.client().unmount("vol", "b1")
