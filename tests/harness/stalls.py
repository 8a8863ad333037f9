"""Load that used to stall the daemon (issue 12): Mounts waiting for stage-in, idle and
slow-sending connections. Shared by tests/daemon/test_no_stalls.py (generous bounds) and
bench/stall_bench.py (the real percentiles).

Everything here is bounded in count and time, and every socket and thread it starts is closed
or joined by the context managers, also when the caller fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.daemon import StowageDaemon
from harness.plugin_client import PluginClient

#: A stage-in source of this size at the smallest bandwidth limit (1 KiB/s, after a 64 KiB
#: burst) takes over an hour: Mounts of such volumes wait for their whole stage_timeout.
SLOW_SOURCE_BYTES = 4 * 1024 * 1024


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: always a value that was really observed."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_slow_source(allowed: Path) -> Path:
    """A host directory (under an --allowed-path) whose stage-in crawls at the bandwidth limit."""
    src = allowed / "slow-source"
    src.mkdir(exist_ok=True)
    with open(src / "big.bin", "wb") as fh:
        fh.truncate(SLOW_SOURCE_BYTES)
    return src


def make_quick_source(allowed: Path) -> Path:
    src = allowed / "quick-source"
    src.mkdir(exist_ok=True)
    (src / "hello.txt").write_text("hello\n")
    return src


def old_stripe(name: str) -> int:
    """The per-volume lock stripe the daemon used before issue 12 (CRC32 % 64): lets a test
    pick an unrelated volume that shared a lock with a waiting one under the old code."""
    return zlib.crc32(name.encode()) % 64


def name_sharing_a_stripe(prefix: str, taken: list[str]) -> str:
    stripes = {old_stripe(n) for n in taken}
    for i in range(10_000):
        candidate = f"{prefix}-{i}"
        if old_stripe(candidate) in stripes:
            return candidate
    raise AssertionError("no colliding name found")


@dataclass
class Timings:
    """Latencies (seconds) per endpoint, and failures (timeouts, errors) as text."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(endpoint, []).append(seconds)

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)

    def all(self) -> list[float]:
        return [v for values in self.latencies.values() for v in values]

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for endpoint, values in sorted(self.latencies.items()):
            out[endpoint] = {
                "n": len(values),
                "p50_ms": percentile(values, 50) * 1000,
                "p99_ms": percentile(values, 99) * 1000,
                "max_ms": max(values) * 1000,
            }
        return out


def read_calls(volume: str) -> list[tuple[str, Callable[[PluginClient], dict[str, Any]]]]:
    return [
        ("Get", lambda c: c.get(volume)),
        ("List", lambda c: c.list()),
        ("Path", lambda c: c.path(volume)),
        ("Capabilities", lambda c: c.capabilities()),
    ]


def measure_reads(
    socket_path: Path, volume: str, seconds: float, clients: int = 4, timeout: float = 10.0
) -> Timings:
    """`clients` threads, each on its own keep-alive connection, cycle through Get, List, Path
    and Capabilities of `volume` for `seconds`; a call that errs or times out is a failure."""
    timings = Timings()
    stop = time.monotonic() + seconds

    def reader(n: int) -> None:
        with PluginClient(str(socket_path), timeout=timeout) as client:
            calls = read_calls(volume)
            i = n
            while time.monotonic() < stop:
                endpoint, call = calls[i % len(calls)]
                i += 1
                started = time.monotonic()
                try:
                    reply = call(client)
                except OSError as exc:
                    timings.fail(f"{endpoint}: {exc!r} after {time.monotonic() - started:.1f}s")
                    client.close()
                    continue
                timings.add(endpoint, time.monotonic() - started)
                if reply.get("Err"):
                    timings.fail(f"{endpoint}: {reply['Err']}")

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    return timings


@contextlib.contextmanager
def waiting_mounts(daemon: StowageDaemon, names: list[str]) -> Iterator[dict[str, Any]]:
    """Mount every volume in `names` at once, each from its own connection and thread. Yields a
    dict the threads fill with name -> reply (or exception text) as Mounts return. On exit the
    connections are closed (a Mount still waiting sees its client go away) and threads joined."""
    replies: dict[str, Any] = {}
    clients = [PluginClient(str(daemon.socket_path), timeout=130) for _ in names]

    def mount(client: PluginClient, name: str) -> None:
        try:
            replies[name] = client.mount(name, "m" * 64)
        except Exception as exc:  # a closed connection at cleanup, a timeout
            replies[name] = repr(exc)

    threads = [
        threading.Thread(target=mount, args=(c, n), daemon=True)
        for c, n in zip(clients, names, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        yield replies
    finally:
        for client in clients:
            # PluginClient retries once on a dropped connection: point that retry nowhere.
            client.socket_path = "/nonexistent/stowage.sock"
            with contextlib.suppress(OSError):
                if client._conn is not None and client._conn.sock is not None:
                    client._conn.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 15
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for client in clients:
            client.close()


@contextlib.contextmanager
def idle_and_slow_clients(
    socket_path: Path, idle: int = 200, slow: int = 8
) -> Iterator[dict[str, int]]:
    """`idle` connections that never send anything, and `slow` clients sending a Get one byte
    per second (slowloris). Yields counters; closes every socket on exit."""
    sockets: list[socket.socket] = []
    stop = threading.Event()
    counters = {"idle": 0, "slow": 0, "bytes_sent": 0}
    request = (
        b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin.moby.localhost\r\n"
        b"Content-Length: 16\r\n\r\n" + b'{"Name": "x"}\n  '
    )

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.settimeout(5)
        sock.connect(str(socket_path))
        return sock

    def dribble(slow_socks: list[socket.socket]) -> None:
        for i in range(len(request)):
            for sock in slow_socks:
                try:
                    sock.send(request[i : i + 1])
                    counters["bytes_sent"] += 1
                except OSError:
                    pass  # the server may give up on a slow client: that is allowed
            if stop.wait(1.0):
                return

    thread: threading.Thread | None = None
    try:
        for _ in range(idle):
            connect()
            counters["idle"] += 1
        slow_socks = [connect() for _ in range(slow)]
        counters["slow"] = len(slow_socks)
        thread = threading.Thread(target=dribble, args=(slow_socks,), daemon=True)
        thread.start()
        yield counters
    finally:
        stop.set()
        if thread is not None:
            thread.join(5)
        for sock in sockets:
            sock.close()
