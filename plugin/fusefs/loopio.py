"""Small S3 requests made on the FUSE process's trio loop itself, with no worker thread.

Why: every kernel request that needs S3 used to hand its blocking request to a worker thread
and wait for the answer to come back. On this 2-core machine that hand-off costs about 0.15 ms
each way round (a futex wake of the worker, the worker's wake when the answer lands, and the
wakeup socket back to the loop), as much as the request itself to a loopback server. A create
is a LOOKUP (HEAD, LIST) and a PUT: two hand-offs. Here the loop sends the request on a
non-blocking connection and sleeps in its own epoll until the answer is in: one wake.

What runs here is bounded so the loop never stalls: HEADs, one-key LISTs and PUTs of at most
`LOOP_PUT_MAX` bytes (their MD5 and signature are computed on the loop: ~0.3 ms at the limit).
Requests are signed, checked and counted by the `FastClient` of the bucket, so the two paths
cannot disagree; only the bytes move differently. Anything unexpected (a broken connection, a
timeout, an answer we cannot parse) raises `FastPathError`, and the caller falls back to the
worker-thread path, which has its own retries.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import trio

from plugin.s3.errors import FastPathError
from plugin.s3.fast import PIPELINE_TRIAL_TIMEOUT, FastClient
from plugin.s3.observe import record
from plugin.s3.transport import (
    add_header,
    answer_outcome,
    chunk_size,
    closes_after,
    operation_name,
    parse_status_line,
)

#: Largest PUT body sent from the loop (its MD5 runs on the loop: ~0.3 ms at 256 KiB).
LOOP_PUT_MAX = 256 * 1024
#: Idle connections kept; more requests at once open more, and close them after.
IDLE_CONNECTIONS = 4
_HEAD_MAX = 64 * 1024
_BODY_MAX = 1 << 20


class _Conn:
    """One kept-alive connection and the bytes received past the last answer."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.reusable = True

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionResetError("connection closed by the server")
        self.buf += data

    async def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                out = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return out
            if len(self.buf) > _HEAD_MAX:
                raise FastPathError("answer head too long")
            await self._more()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def answer(self, *, body: bool) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, lower-cased headers, body (none for a HEAD)."""
        version, status = parse_status_line(await self.line())
        headers: dict[str, str] = {}
        while (line := await self.line()) not in (b"\r\n", b"\n"):
            add_header(line, headers)
        if closes_after(version, headers):
            self.reusable = False
        if not body:
            return status, headers, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while size := chunk_size(await self.line()):
                if size > _BODY_MAX:
                    raise FastPathError(f"chunk of {size} bytes")
                parts.append(await self.exactly(size))
                await self.line()
            while await self.line() not in (b"\r\n", b"\n"):
                pass  # trailers
            return status, headers, b"".join(parts)
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > _BODY_MAX:
            raise FastPathError(f"answer body of length {length!r}")
        return status, headers, await self.exactly(int(length))

    async def close(self) -> None:
        self.reusable = False
        await trio.aclose_forcefully(self.stream)


class LoopRequests:
    """HEAD, LIST and small PUTs of one bucket from the trio loop (see the module doc)."""

    def __init__(self, fast: FastClient) -> None:
        self.fast = fast
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        fast = self.fast
        with trio.fail_after(fast.connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(fast.host, fast.port)
            if fast.tls_context is not None:
                tls = trio.SSLStream(stream, fast.tls_context, server_hostname=fast.host)
                await tls.do_handshake()
                stream = tls
        return _Conn(stream)

    async def _exchange(
        self, request: bytes, answers: list[tuple[str, bool]]
    ) -> list[tuple[int, dict[str, str], bytes]]:
        """Send *request* (one, or several pipelined) and read one answer per entry of
        *answers*: (what, has a body). While the server's pipelining is unproven, the second
        answer must follow the first within the same trial time as the thread path allows
        (`FastClient` switches pipelining off otherwise). A kept-alive connection the server
        closed meanwhile gets one fresh try; any other failure is a FastPathError."""
        fast = self.fast
        if not fast.enabled:
            raise FastPathError("disabled")
        for attempt in range(2):
            conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            started = time.monotonic()
            got: list[tuple[int, dict[str, str], bytes]] = []
            try:
                with trio.fail_after(fast.read_timeout):
                    if conn is None:
                        conn = await self._connect()
                    await conn.stream.send_all(request)
                    for _what, body in answers:
                        if got and not fast.pipelining_proven:
                            wait = max(PIPELINE_TRIAL_TIMEOUT, 4 * (time.monotonic() - started))
                            with trio.fail_after(wait):
                                got.append(await conn.answer(body=body))
                        else:
                            got.append(await conn.answer(body=body))
            except (OSError, ValueError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                if conn is not None:
                    await conn.close()
                if attempt == 0 and reused and not got:
                    continue  # the server had closed this idle connection: once more, fresh
                if len(answers) > 1:
                    # Not an idle connection gone stale: this server does not pipeline.
                    fast.pipelining = False
                for what, _ in answers:
                    record(operation_name(what), "error", time.monotonic() - started)
                raise FastPathError(f"{answers[0][0]} from the loop: {exc!r}") from exc
            except BaseException:
                if conn is not None:
                    await conn.close()  # cancelled mid-answer: the stream is out of step
                raise
            elapsed = time.monotonic() - started
            for (what, _), (status, _, data) in zip(answers, got, strict=True):
                record(operation_name(what), answer_outcome(status, data), elapsed)
            if len(got) > 1:
                fast.pipelining_proven = True
            if conn.reusable and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:
                await conn.close()
            return got
        raise FastPathError("unreachable")

    async def head_then_list(
        self, key: str, prefix: str, *, together: bool
    ) -> tuple[tuple[int, dict[str, str]], dict[str, Any] | None]:
        """`FastClient.head_then_list` from the loop (same answers, same checks)."""
        fast = self.fast
        head = fast.request_bytes(key)
        if together and fast.keepalive and fast.pipelining:
            listing = fast.list_request(prefix, None, "/", 1)
            (status, headers, _), (list_status, _, body) = await self._exchange(
                head + listing, [("HEAD", False), ("LIST", True)]
            )
            fast.head_answer(status)
            if status != 404:
                return (status, headers), None
            return (status, headers), fast.listed(list_status, body)
        ((status, headers, _),) = await self._exchange(head, [("HEAD", False)])
        fast.head_answer(status)
        if status != 404:
            return (status, headers), None
        # Signed only now: a lookup that finds a file pays no second signature.
        listing = fast.list_request(prefix, None, "/", 1)
        ((list_status, _, body),) = await self._exchange(listing, [("LIST", True)])
        return (status, headers), fast.listed(list_status, body)

    async def put_object(self, key: str, body: bytes, headers: list[tuple[str, str]]) -> str:
        """PUT a small object (at most `LOOP_PUT_MAX` bytes); its ETag as the server gave it."""
        if len(body) > LOOP_PUT_MAX:
            raise FastPathError(f"{len(body)} bytes is over the loop's {LOOP_PUT_MAX}")
        request = self.fast.put_request(key, body, headers, hashlib.md5(body).digest())
        ((status, answer, reply),) = await self._exchange(request + body, [("PUT", True)])
        self.fast.put_answer("PUT", status, reply)
        return answer.get("etag", "")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
