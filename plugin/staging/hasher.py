"""The MD5 (plain or multipart ETag) of a part file being filled chunk by chunk, computed while
the chunks land so verifying a large download costs no pass at the end."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from plugin.staging.verify import multipart_etag

log = logging.getLogger(__name__)


class Hasher:
    """Checksum of a part file being filled chunk by chunk in any order, computed while the
    chunks land so verification costs no pass at the end.

    - plain MD5 ETag: one thread hashes the contiguous finished prefix in order (MD5 is
      sequential), overlapped with the chunks still downloading. Downloads may run at most
      *lead* chunks ahead of it (`wait_for_room`): unchecked, they finish first while the
      hasher, starved of CPU by them and the server, has done an eighth of the file, and it
      then hashes the rest alone on one core (1 GiB on 2 cores: 2.6 s, with the lead 2.3 s);
    - multipart ETag (`md5-of-part-md5s-N`): parts are independent, so the worker that
      finishes a part's last chunk hashes that part at once, in parallel with the others.

    Reads are preads into a small reused buffer (hashlib and pread both release the GIL), not
    an mmap: a part file truncated behind our back must fail verification, not SIGBUS the
    daemon that runs the copy. A short read leaves the result None, which never matches.
    """

    _BUFFER = 1 << 20

    def __init__(
        self, fd: int, size: int, chunk_size: int, part_size: int | None, lead: int | None = None
    ) -> None:
        self._fd = fd
        self._size = size
        self._chunk = chunk_size
        self._nchunks = max(1, (size + chunk_size - 1) // chunk_size)
        self._part_size = part_size
        self._done = [False] * self._nchunks
        self._lead = self._nchunks if lead is None else max(1, lead)
        self._hashed = 0  # chunks hashed in order (plain MD5)
        self._over = False  # the in-order hash ended (result, short read or stop)
        self._cond = threading.Condition()
        self._stopped = False
        self._busy = 0  # part hashes in flight; stop() waits for them (the fd closes after)
        self._short_read = False
        self._result: str | None = None
        self._thread: threading.Thread | None = None
        self._parts: list[bytes | None] = []
        self._parts_left: list[int] = []
        if part_size is None:
            self._thread = threading.Thread(target=self._run, name="stowage-hash", daemon=True)
            self._thread.start()
        else:
            nparts = max(1, (size + part_size - 1) // part_size)
            self._parts = [None] * nparts
            self._parts_left = [len(self._chunks_of(p)) for p in range(nparts)]

    def _chunks_of(self, part: int) -> range:
        assert self._part_size is not None
        start = part * self._part_size
        end = min(start + self._part_size, self._size)
        return range(start // self._chunk, max(start // self._chunk + 1, -(-end // self._chunk)))

    def mark(self, index: int) -> None:
        """Chunk *index* is written; hash whatever that completes."""
        if self._part_size is None:
            with self._cond:
                self._done[index] = True
                self._cond.notify_all()
            return
        first = index * self._chunk // self._part_size
        last = (min((index + 1) * self._chunk, self._size) - 1) // self._part_size
        for p in range(first, last + 1):
            with self._cond:
                self._parts_left[p] -= 1
                ready = self._parts_left[p] == 0 and not self._stopped
                if ready:
                    self._busy += 1
            if not ready:
                continue
            ok = False
            try:
                start = p * self._part_size
                end = min(start + self._part_size, self._size)
                md5 = hashlib.md5()
                ok = self._update(md5, start, end, bytearray(self._BUFFER))
            finally:
                with self._cond:
                    self._busy -= 1
                    if ok:
                        self._parts[p] = md5.digest()
                    else:
                        self._short_read = True
                    self._cond.notify_all()

    def wait_for_room(self, index: int, stopping: Callable[[], bool]) -> None:
        """Block a download of chunk *index* while it would run more than the lead ahead of
        the in-order hash. No deadlock: the lowest chunk not yet hashed is always in room."""
        if self._thread is None:
            return
        with self._cond:
            while index >= self._hashed + self._lead and not self._over and not stopping():
                self._cond.wait(0.2)

    def _update(self, md5: Any, start: int, end: int, buf: bytearray) -> bool:
        """Feed bytes [start, end) of the part file to *md5*; False on a short read."""
        view = memoryview(buf)
        pos = start
        while pos < end:
            n = os.preadv(self._fd, [view[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                log.warning("part file shrank while being verified (at byte %d of %d)", pos, end)
                return False
            md5.update(view[:n])
            pos += n
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            while self._busy:
                self._cond.wait()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
        elif not self._short_read and self._parts and all(d is not None for d in self._parts):
            self._result = multipart_etag(d for d in self._parts if d is not None)
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._hash_in_order()
        finally:
            with self._cond:
                self._over = True  # room for every waiting download: nothing will hash now
                self._cond.notify_all()

    def _hash_in_order(self) -> str | None:
        whole = hashlib.md5()
        buf = bytearray(self._BUFFER)
        for i in range(self._nchunks):
            with self._cond:
                while not self._done[i] and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return None
            start, end = i * self._chunk, min((i + 1) * self._chunk, self._size)
            if not self._update(whole, start, end, buf):
                return None
            with self._cond:
                self._hashed = i + 1
                self._cond.notify_all()
        return whole.hexdigest()
