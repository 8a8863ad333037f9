"""Chunks no CRC needs go from the socket into the part file with splice(2), never through
user space (`transport.splice_exact`, `FastClient.get_range_to_file`, `store.FileSink`).

On this 2-core machine that took a 1 GiB download's client system time from ~0.57 s to
~0.40 s, and its wall time from 1.09-1.14 s to 1.01-1.02 s (docs/benchmarks.md, copy
section). Each test here fails when the mechanism, or the care around it, is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server, crt_download

from plugin.s3 import transport
from plugin.s3.crtstore import CrtStore
from plugin.s3.errors import FastPathError
from plugin.s3.fast import FastClient

MiB = 1 << 20


class _OneAnswer:
    """A loopback TCP peer that sends *head* and *body* (in one send, so the reader buffers
    part of the body with the head), then stalls or closes."""

    def __init__(self, head: bytes, body: bytes, *, close: bool) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._payload, self._close = head + body, close
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.client = socket.create_connection(self._listener.getsockname()[:2], timeout=5)
        self.reader = self.client.makefile("rb")

    def _serve(self) -> None:
        peer, _ = self._listener.accept()
        with peer, contextlib.suppress(ConnectionError):  # the reader may stop early
            peer.sendall(self._payload)
            if not self._close:
                self._done.wait(10)

    def splice_into(
        self, fd: int, offset: int, length: int, landed: Callable[[int], None] = lambda n: None
    ) -> int:
        """Read the answer's head, then splice its body into *fd* as the fast path does."""
        while self.reader.readline() not in (b"\r\n", b""):
            pass
        pipe = transport.SplicePipe()  # referenced until the call ends: closed when dropped
        return transport.splice_exact(
            self.reader, self.client, pipe.fds, fd, offset, length, landed
        )

    def close(self) -> None:
        self._done.set()
        self.reader.close()
        self.client.close()
        self._thread.join(10)
        self._listener.close()


@pytest.fixture
def splice_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int | None]]]:
    """Every os.splice call as (count asked, file offset or None for socket -> pipe)."""
    calls: list[tuple[int, int | None]] = []
    real = os.splice

    def recording(src: int, dst: int, count: int, **kw: Any) -> int:
        calls.append((count, kw.get("offset_dst")))
        return real(src, dst, count, **kw)

    monkeypatch.setattr(os, "splice", recording)
    yield calls


def _answer(length: int) -> bytes:
    return f"HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\n\r\n".encode()


def test_splice_moves_a_body_into_the_file_at_its_offset(
    tmp_path: Path, splice_calls: list[tuple[int, int | None]]
) -> None:
    body = os.urandom(3 * MiB + 5)
    peer = _OneAnswer(_answer(len(body)), body, close=False)
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        landed: list[int] = []
        n = peer.splice_into(fd, 1000, len(body), landed.append)
        assert n == len(body) == sum(landed)
        assert (tmp_path / "part").read_bytes() == bytes(1000) + body
        assert peer.client.gettimeout() == 5  # the read timeout is back for the next request
    finally:
        os.close(fd)
        peer.close()
    into_file = [count for count, offset in splice_calls if offset is not None]
    assert into_file, "no byte went from the pipe into the file by splice"
    assert max(into_file) <= transport.SPLICE_PIECE  # the inode lock held for 1 MiB at most


def test_a_body_cut_short_returns_what_landed(tmp_path: Path) -> None:
    body = os.urandom(2 * MiB)
    peer = _OneAnswer(_answer(4 * MiB), body, close=True)
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        landed: list[int] = []
        n = peer.splice_into(fd, 0, 4 * MiB, landed.append)
        assert n == sum(landed) == len(body)
        assert (tmp_path / "part").read_bytes() == body
    finally:
        os.close(fd)
        peer.close()


def test_a_stalled_server_ends_in_the_read_timeout(tmp_path: Path) -> None:
    peer = _OneAnswer(_answer(MiB), b"x" * 1000, close=False)
    peer.client.settimeout(0.3)
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(FastPathError, match="no data from the server"):
            peer.splice_into(fd, 0, MiB)
    finally:
        os.close(fd)
        peer.close()


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        (os.O_RDONLY, errno.EBADF),  # fails the pwrite of the bytes buffered with the head
        (os.O_WRONLY | os.O_APPEND, errno.EINVAL),  # takes those, fails the splice after
    ],
)
def test_the_files_trouble_is_not_taken_for_the_connections(
    tmp_path: Path, flags: int, code: int
) -> None:
    """A write error (here EBADF or EINVAL; ENOSPC on a full disk) is the file's: it must
    not be reported as a transport failure, which would send the caller to another client."""
    body = os.urandom(MiB)
    peer = _OneAnswer(_answer(len(body)), body, close=False)
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path / "f", flags)
    try:
        with pytest.raises(OSError) as info:
            peer.splice_into(fd, 0, len(body))
        assert not isinstance(info.value, FastPathError)
        assert info.value.errno == code
    finally:
        os.close(fd)
        peer.close()


def test_a_threads_pipe_is_closed_when_its_thread_ends() -> None:
    """Each copy worker keeps its pipe in a thread-local: it must not outlive the thread
    (a daemon running copy after copy would run out of file descriptors)."""
    local = threading.local()
    fds: list[int] = []

    def worker() -> None:
        local.pipe = transport.SplicePipe()
        fds.extend(local.pipe.fds)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert len(fds) == 2
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


def test_tls_endpoints_do_not_splice() -> None:
    keys = ("k", "s", None)
    assert FastClient("http://127.0.0.1:9", "b", "us-east-1", lambda: keys).splices
    assert not FastClient("https://127.0.0.1:9", "b", "us-east-1", lambda: keys).splices


def _put(server: S3Server, bucket: str, size: int) -> bytes:
    data = os.urandom(size)
    server.client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    return data


@pytest.mark.s3
@pytest.mark.parametrize("verify", [True, False])
def test_md5_and_unverified_downloads_splice_their_chunks(
    rclone_s3: S3Server,
    bucket_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    splice_calls: list[tuple[int, int | None]],
    verify: bool,
) -> None:
    bucket = rclone_s3.make_bucket(bucket_name)
    data = _put(rclone_s3, bucket, 10 * MiB + 3)

    def no_buffer(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a chunk went through a user-space buffer")

    monkeypatch.setattr(FastClient, "get_range_into", no_buffer)
    dst = tmp_path / "out.bin"
    res = crt_download(rclone_s3, bucket, "big.bin", dst, verify=verify)
    assert res.ok, res.errors
    assert res.checks == ({"md5": 1} if verify else {"size-only": 1})
    assert res.bytes_copied == len(data)
    assert dst.read_bytes() == data
    assert sum(count for count, offset in splice_calls if offset is not None) >= len(data) - 65536


@pytest.mark.s3
def test_a_stream_broken_mid_splice_is_finished_without_counting_twice(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first chunk's connection resets after 1.5 MiB landed: the general client fetches
    the rest of that chunk only, and the progress counts each byte once."""
    bucket = rclone_s3.make_bucket(bucket_name)
    data = _put(rclone_s3, bucket, 6 * MiB)
    real = os.splice
    from_socket = [0]
    broken = threading.Event()

    def resetting(src: int, dst: int, count: int, **kw: Any) -> int:
        if kw.get("offset_dst") is None and not broken.is_set():
            if from_socket[0] >= 3 * MiB // 2:
                broken.set()
                raise ConnectionResetError(errno.ECONNRESET, "reset (injected)")
            count = min(count, 3 * MiB // 2 - from_socket[0])
            n = real(src, dst, count, **kw)
            from_socket[0] += n
            return n
        return real(src, dst, count, **kw)

    monkeypatch.setattr(os, "splice", resetting)
    asked: list[tuple[int, int | None]] = []
    real_general = CrtStore._general_get

    def general(self: CrtStore, bucket: str, key: str, sink: Any, start: int, n: Any) -> Any:
        asked.append((start, n))
        return real_general(self, bucket, key, sink, start, n)

    monkeypatch.setattr(CrtStore, "_general_get", general)
    dst = tmp_path / "out.bin"
    res = crt_download(rclone_s3, bucket, "big.bin", dst, jobs=1)
    assert res.ok, res.errors
    assert broken.is_set()
    # Only what had not landed (the 1.5 MiB spliced and what came buffered with the head).
    [(start, rest)] = asked
    assert 3 * MiB // 2 <= start < 3 * MiB // 2 + 65536 and start + rest == 4 * MiB
    assert res.bytes_copied == len(data)
    assert dst.read_bytes() == data


@pytest.mark.s3
def test_a_byte_spoiled_on_the_spliced_path_fails_the_md5_check(
    rclone_s3: S3Server, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spliced bytes never pass through the process, so the MD5 must be computed from what
    is in the part file: one byte flipped there (after the splice, before the hash) fails
    the copy, and nothing is renamed into place."""
    bucket = rclone_s3.make_bucket(bucket_name)
    _put(rclone_s3, bucket, 10 * MiB + 3)
    real = transport.splice_exact
    spoil_at = 5 * MiB + 17  # inside the second 4 MiB chunk

    def spoiling(
        fp: Any, sock: Any, pipe: Any, fd: int, offset: int, length: int, landed: Any
    ) -> int:
        n = real(fp, sock, pipe, fd, offset, length, landed)
        if offset <= spoil_at < offset + n:
            byte = os.pread(fd, 1, spoil_at)
            os.pwrite(fd, bytes([byte[0] ^ 0x01]), spoil_at)
        return n

    monkeypatch.setattr("plugin.s3.fast.splice_exact", spoiling)
    dst = tmp_path / "d" / "out.bin"
    dst.parent.mkdir()
    res = crt_download(rclone_s3, bucket, "big.bin", dst)
    assert res.state == "failed", res.errors
    assert "MD5" in res.errors[0].message and "does not match" in res.errors[0].message
    assert not dst.exists()
