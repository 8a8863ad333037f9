"""The overlapped checksum of a part file filled chunk by chunk in any order (no server)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from plugin.staging.engine import _Hasher, multipart_etag

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
