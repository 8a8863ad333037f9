"""Downloaded chunks reach the part file in writes of at most `WRITE_PIECE` (1 MiB).

Parallel chunk workers write into one part file, and a buffered write holds the file's
inode lock while the kernel copies it: with 8 MiB writes from 8 workers on this 2-vCPU
machine, the waiters' spinning on that lock starved the holder, and a 1 GiB download spent
2.5-9 s in the kernel in one run out of four, against 0.26-0.28 s for 1 MiB writes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server, crt_download

from plugin.staging import localfs

MiB = 1 << 20


def test_pwrite_all_writes_in_pieces_and_completes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * localfs.WRITE_PIECE + 12345)
    sizes: list[int] = []
    real = os.pwrite

    def short_pwrite(fd: int, buf: Any, offset: int) -> int:
        sizes.append(len(buf))
        return real(fd, bytes(buf)[: max(1, len(buf) // 2)], offset)  # always short

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        monkeypatch.setattr(os, "pwrite", short_pwrite)
        localfs.pwrite_all(fd, memoryview(data), 100)
        monkeypatch.setattr(os, "pwrite", lambda fd, buf, offset: 0)
        with pytest.raises(OSError) as info:
            localfs.pwrite_all(fd, memoryview(b"x"), 0)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert max(sizes) <= localfs.WRITE_PIECE
    assert (tmp_path / "f").read_bytes() == bytes(100) + data


@pytest.mark.s3
def test_chunked_download_writes_at_most_a_piece_at_a_time(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    data = os.urandom(10 * MiB + 3)
    rclone_s3.client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    dst = tmp_path / "out" / "big.bin"
    dst.parent.mkdir()
    sizes: list[int] = []
    real, real_splice = os.pwrite, os.splice

    def recording_pwrite(fd: int, buf: Any, offset: int) -> int:
        sizes.append(len(buf))
        return real(fd, buf, offset)

    def recording_splice(src: int, dst: int, count: int, **kw: Any) -> int:
        if kw.get("offset_dst") is not None:  # pipe -> part file (plain HTTP, no CRC)
            sizes.append(count)
        return real_splice(src, dst, count, **kw)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    monkeypatch.setattr(os, "splice", recording_splice)
    res = crt_download(rclone_s3, bucket, "big.bin", dst)
    assert res.ok, res.errors
    assert res.checks == {"md5": 1}
    assert dst.read_bytes() == data
    assert sum(sizes) >= len(data) and max(sizes) <= localfs.WRITE_PIECE
