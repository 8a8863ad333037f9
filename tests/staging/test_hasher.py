"""The overlapped checksum of a part file filled chunk by chunk in any order (no server)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from plugin.staging.hasher import Hasher as _Hasher
from plugin.staging.verify import multipart_etag

KiB = 1024


def _expected(data: bytes, part: int | None) -> str:
    if part is None:
        return hashlib.md5(data).hexdigest()
    return multipart_etag(
        hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)
    )


@pytest.mark.parametrize(
    ("size", "chunk", "part"),
    [
        (1000 * KiB + 7, 64 * KiB, None),  # plain MD5, last chunk short
        (1000 * KiB + 7, 64 * KiB, 64 * KiB),  # parts = chunks
        (1000 * KiB + 7, 64 * KiB, 160 * KiB),  # parts span chunks, not aligned
        (1000 * KiB + 7, 128 * KiB, 48 * KiB),  # several parts per chunk
        (512 * KiB, 128 * KiB, 512 * KiB),  # one part
    ],
)
def test_hash_matches_whatever_order_chunks_land(
    tmp_path: Path, size: int, chunk: int, part: int | None
) -> None:
    data = random.Random(size + chunk).randbytes(size)
    path = tmp_path / "part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        h = _Hasher(fd, size, chunk, part)
        order = list(range(-(-size // chunk)))
        random.Random(1).shuffle(order)

        # Two "workers" write and mark chunks concurrently, like the engine's pool.
        def worker(idx: list[int]) -> None:
            for i in idx:
                os.pwrite(fd, data[i * chunk : (i + 1) * chunk], i * chunk)
                h.mark(i)

        ts = [threading.Thread(target=worker, args=(order[k::2],)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert h.result() == _expected(data, part)
    finally:
        os.close(fd)


def test_a_changed_byte_changes_the_result(tmp_path: Path) -> None:
    size, chunk = 300 * KiB, 64 * KiB
    data = bytearray(random.Random(2).randbytes(size))
    want = {p: _expected(bytes(data), p) for p in (None, 100 * KiB)}
    data[200 * KiB] ^= 1
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        for part, good in want.items():
            h = _Hasher(fd, size, chunk, part)
            for i in range(-(-size // chunk)):
                h.mark(i)
            assert h.result() != good
    finally:
        os.close(fd)


def test_stop_before_all_chunks_land(tmp_path: Path) -> None:
    """A failed file stops its hasher without waiting for chunks that never come."""
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 256 * KiB)
        for part in (None, 64 * KiB):
            h = _Hasher(fd, 256 * KiB, 64 * KiB, part)
            h.mark(0)
            h.stop()
    finally:
        os.close(fd)


def _waiter(h: _Hasher, index: int, stopping: threading.Event) -> threading.Thread:
    """A download of chunk *index* waiting for room, as the engine's worker does."""
    t = threading.Thread(target=h.wait_for_room, args=(index, stopping.is_set), daemon=True)
    t.start()
    return t


def test_downloads_wait_within_the_lead_of_the_in_order_hash(tmp_path: Path) -> None:
    """A download may not run more than *lead* chunks ahead of the plain-MD5 hash; room
    opens as the hash moves on, and chunks inside the lead never wait."""
    size, chunk = 8 * 64 * KiB, 64 * KiB
    data = random.Random(5).randbytes(size)
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        h = _Hasher(fd, size, chunk, None, lead=2)
        never = threading.Event()
        h.wait_for_room(1, never.is_set)  # inside the lead: returns at once
        far = _waiter(h, 4, never)  # needs chunks 0-2 hashed
        for i in range(2):
            os.pwrite(fd, data[i * chunk : (i + 1) * chunk], i * chunk)
            h.mark(i)
        far.join(0.5)
        assert far.is_alive(), "chunk 4 started with only chunks 0-1 hashed (lead 2)"
        os.pwrite(fd, data[2 * chunk : 3 * chunk], 2 * chunk)
        h.mark(2)
        far.join(10)
        assert not far.is_alive(), "chunk 4 still waits with chunks 0-2 hashed"
        for i in range(3, 8):
            os.pwrite(fd, data[i * chunk : (i + 1) * chunk], i * chunk)
            h.mark(i)
        assert h.result() == hashlib.md5(data).hexdigest()
    finally:
        os.close(fd)


def test_waiting_downloads_are_released_when_the_hash_cannot_go_on(tmp_path: Path) -> None:
    """Chunk 0 never lands (its GET failed, or the copy is cancelled): downloads waiting
    for room must not hang. Released by the caller's stop signal, and by stop()."""
    size, chunk = 8 * 64 * KiB, 64 * KiB
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        h = _Hasher(fd, size, chunk, None, lead=2)
        given_up, never = threading.Event(), threading.Event()
        by_signal, by_stop = _waiter(h, 5, given_up), _waiter(h, 6, never)
        by_signal.join(0.3)
        assert by_signal.is_alive() and by_stop.is_alive()
        given_up.set()
        by_signal.join(10)
        assert not by_signal.is_alive() and by_stop.is_alive()
        h.stop()
        by_stop.join(10)
        assert not by_stop.is_alive()
        assert h.result() is None
        # Parts hashed by the workers themselves (multipart ETag) never make anyone wait.
        parts = _Hasher(fd, size, chunk, 2 * chunk, lead=1)
        parts.wait_for_room(7, never.is_set)
        parts.stop()
    finally:
        os.close(fd)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("part", [None, 3 * 1024 * KiB])
def test_hashing_memory_stays_bounded(tmp_path: Path, part: int | None) -> None:
    """Hashing a 64 MiB file must not hold the file (or its parts) in memory."""
    size, chunk = 64 * 1024 * KiB, 1024 * KiB
    path = tmp_path / "big"
    with open(path, "wb") as fh:
        fh.write(random.Random(3).randbytes(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _rss_kib()
        h = _Hasher(fd, size, chunk, part)
        for i in range(size // chunk):
            h.mark(i)
        if h._thread is not None:
            h._thread.join()
        grown = _rss_kib() - before
        assert h.result() is not None
        assert grown < 16 * 1024, f"RSS grew by {grown} KiB"
    finally:
        os.close(fd)


@pytest.mark.parametrize("part", [None, 64 * KiB])
def test_part_file_truncated_behind_our_back_fails_verification(
    tmp_path: Path, part: int | None
) -> None:
    """Someone truncates the part file mid-copy: the checksum fails (None), nothing crashes
    (an mmap here would SIGBUS the whole daemon)."""
    size, chunk = 256 * KiB, 64 * KiB
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, random.Random(4).randbytes(size), 0)
        h = _Hasher(fd, size, chunk, part)
        h.mark(0)
        os.ftruncate(fd, 100 * KiB)
        for i in range(1, size // chunk):
            h.mark(i)
        assert h.result() is None
    finally:
        os.close(fd)
