"""The real `stowage serve` process on its unix socket: startup, bad input, crashes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness.daemon import StowageDaemon, socket_accepts, stowage_executable
from harness.plugin_client import PluginClient

ID = "c" * 64


def files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def raw_request(socket_path: Path, request: bytes) -> bytes:
    """Send bytes as they are, then read whatever comes back before the server closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(socket_path))
    try:
        # The server may answer before reading everything: then read its answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                break
        return b"".join(chunks)
    finally:
        sock.close()


def test_socket_is_root_only_0660(daemon: StowageDaemon) -> None:
    st = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_mode & 0o777 == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_bad_input_gets_clear_errors_and_daemon_keeps_serving(
    daemon: StowageDaemon, workdir: Path
) -> None:
    outside_before = files_under(workdir) - files_under(daemon.root)
    client = daemon.client()
    hostile = ["../../etc", "a/../../b", "/abs", "x\0y", "", ".", "x" * 300, "a\nb"]
    for name in hostile:
        reply = client.create(name, None)
        assert reply["Err"], f"Create {name!r} must fail"
        assert "volume name" in reply["Err"]
    status, body = client.raw("/VolumeDriver.Create", b'{"Name": "x", "Opts": ')
    assert status == 500 and b"not valid JSON" in body
    status, body = client.raw("/VolumeDriver.Mount", b"")
    assert status == 500 and b"empty request body" in body
    status, body = client.raw("/Plugin.Deactivate", b"{}")
    assert status == 404 and b"unknown endpoint" in body
    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    answer = raw_request(
        daemon.socket_path,
        b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(huge)
        + huge,
    )
    assert b" 413 " in answer.split(b"\r\n", 1)[0]
    assert b"request body too large" in answer
    garbage = raw_request(daemon.socket_path, b"\x00\x01 not http at all\r\n\r\n")
    assert b"HTTP/1.1 400" in garbage or garbage == b""

    fresh = daemon.client()
    assert fresh.create("still-works", None) == {"Err": ""}
    assert [v["Name"] for v in fresh.list()["Volumes"]] == ["still-works"]
    outside_after = files_under(workdir) - files_under(daemon.root)
    assert outside_after - outside_before <= {daemon.log_path, daemon.root}


def test_concurrent_calls_while_one_is_slow(daemon: StowageDaemon) -> None:
    """Many threads at once, like dockerd starting containers in parallel."""
    errors: list[str] = []

    def worker(n: int) -> None:
        client = PluginClient(str(daemon.socket_path))
        for i in range(20):
            name = f"v{n}-{i}"
            for reply in (client.create(name, None), client.mount(name, ID)):
                if reply["Err"]:
                    errors.append(reply["Err"])
            if client.get(name)["Volume"]["Status"]["mounts"] != 1:
                errors.append(f"{name}: wrong mount count")
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(daemon.client().list()["Volumes"]) == 120


def test_sigkill_during_creates_loses_nothing_acknowledged(daemon: StowageDaemon) -> None:
    """kill -9 mid-burst: every Create that returned success is there after restart."""
    acknowledged: list[str] = []
    stop = threading.Event()

    def creator() -> None:
        client = PluginClient(str(daemon.socket_path))
        for i in range(5000):
            if stop.is_set():
                return
            try:
                reply = client.create(f"burst-{i}", {"mode": "0700"})
            except OSError:
                client.close()
                return
            if reply == {"Err": ""}:
                acknowledged.append(f"burst-{i}")
        client.close()

    thread = threading.Thread(target=creator)
    thread.start()
    deadline = time.monotonic() + 10
    while len(acknowledged) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.kill()
    stop.set()
    thread.join(30)
    assert len(acknowledged) >= 50

    daemon.start()
    client = daemon.client()
    names = {v["Name"] for v in client.list()["Volumes"]}
    assert set(acknowledged) <= names
    for name in names:  # nothing half-written: every record is complete and usable
        status = client.get(name)["Volume"]["Status"]
        assert status["options"] == {"mode": "0700"}
        assert (daemon.root / "volumes" / name / "data").is_dir()
    assert client.create("after-crash", None) == {"Err": ""}


def test_restart_remembers_everything(daemon: StowageDaemon) -> None:
    client = daemon.client()
    assert client.create("keep", {"uid": "1000", "mode": "0750"}) == {"Err": ""}
    assert client.mount("keep", ID)["Err"] == ""
    before = client.get("keep")["Volume"]
    daemon.kill()
    daemon.start()
    after = daemon.client().get("keep")["Volume"]
    assert after == before
    assert after["Status"]["mounts"] == 1


def test_stale_socket_is_replaced(workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    sock_path = workdir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on: what a crashed daemon leaves
    daemon = StowageDaemon(sock_path, workdir / "root", workdir / "log")
    daemon.start()
    try:
        assert daemon.client().activate() == {"Implements": ["VolumeDriver"]}
    finally:
        daemon.kill()


def test_refuses_to_steal_a_live_socket(daemon: StowageDaemon, workdir: Path) -> None:
    result = subprocess.run(
        [
            *stowage_executable(),
            "serve",
            "--socket",
            str(daemon.socket_path),
            "--root",
            str(workdir / "other"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "another process is already serving" in result.stderr
    assert daemon.client().activate() == {"Implements": ["VolumeDriver"]}


def test_sigterm_exits_well_within_dockers_10s(daemon: StowageDaemon) -> None:
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 9
    assert not socket_accepts(str(daemon.socket_path))


def test_socket_accepts_quickly_after_start(workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    daemon = StowageDaemon(workdir / "fast.sock", workdir / "root", workdir / "log")
    started = time.monotonic()
    daemon.start()
    try:
        ready = time.monotonic() - started
        with PluginClient(str(daemon.socket_path)) as client:
            assert client.list() == {"Volumes": [], "Err": ""}
        assert ready < 5, f"socket took {ready:.1f}s"
    finally:
        daemon.kill()


def test_logs_go_to_stdout_not_stderr(workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    proc = subprocess.Popen(
        [
            *stowage_executable(),
            "serve",
            "--socket",
            str(workdir / "o.sock"),
            "--root",
            str(workdir / "root"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_accepts(str(workdir / "o.sock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        with PluginClient(str(workdir / "o.sock")) as client:
            client.create("v", None)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert b"created volume v" in out
    assert b"Booting worker" in out
    assert err == b""
