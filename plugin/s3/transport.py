"""The kept-alive HTTP/1.1 transport of the fast path: one connection per thread, requests
written whole, answers parsed by hand, bodies received straight into the caller's buffer or,
over plain HTTP, spliced from the socket into the caller's file (`splice_exact`).

Why not http.client: its per-request bookkeeping and the copies of every body on the way up
cost CPU that a 2-core machine spends on the data path; and pipelined requests (several
requests sent before the first answer) need the socket itself. Transport failures raise
`FastPathError`: the caller falls back to its general client.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field

from plugin.s3 import observe, xmldoc
from plugin.s3.errors import FastPathError

#: S3 API names of the fast path's requests (`what` without a part number), for `observe`.
OPERATIONS = {
    "HEAD": "HeadObject",
    "LIST": "ListObjectsV2",
    "GET": "GetObject",
    "PUT": "PutObject",
    "UPLOAD PART": "UploadPart",
    "CREATE UPLOAD": "CreateMultipartUpload",
    "LIST UPLOADS": "ListMultipartUploads",
    "COMPLETE UPLOAD": "CompleteMultipartUpload",
}


def operation_name(what: str) -> str:
    """The S3 API name of a request described as *what* ("UPLOAD PART 3": "UploadPart")."""
    return OPERATIONS.get(what.rstrip("0123456789 "), what)


def answer_outcome(status: int, body: bytes = b"") -> str:
    """What `observe` reports for an answer: "ok", its S3 code, or its status (an <Error>
    inside a 200, as CompleteMultipartUpload may send, counts as that error)."""
    if status < 300:
        small_error = len(body) <= 65536 and b"<Error>" in body[:512]
        return (xmldoc.error_code(body) or "ok") if small_error else "ok"
    return xmldoc.error_code(body) or str(status)


def read_exact(fp: io.BufferedReader, sock: socket.socket, view: memoryview) -> int:
    """Fill *view* with the next bytes of a response body: those already in *fp*'s buffer,
    then straight from *sock* with MSG_WAITALL, one syscall (and one release of the GIL) for
    the lot instead of one per arriving segment. TLS sockets take no recv flags and are read
    through *fp*. Returns the count: short only at end of stream. A read timeout set on the
    socket still applies (as SO_RCVTIMEO) and raises TimeoutError."""
    done = 0
    if fp.peek(1):  # bytes buffered (or, buffer empty, the first ones to arrive)
        done = fp.readinto1(view)
    if type(sock) is not socket.socket:
        while done < len(view):
            n = fp.readinto(view[done:])
            if not n:
                break
            done += n
        return done
    timeout = sock.gettimeout()
    try:
        sock.settimeout(None)  # MSG_WAITALL needs a blocking socket...
        seconds = timeout or 0.0
        # ...and SO_RCVTIMEO keeps the read timeout: a stalled server ends the recv.
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        while done < len(view):
            n = sock.recv_into(view[done:], len(view) - done, socket.MSG_WAITALL)
            if not n:
                break
            done += n
    except BlockingIOError as exc:
        raise TimeoutError(f"no data from the server for {timeout} s") from exc
    finally:
        sock.settimeout(timeout)
    return done


#: Bytes one splice(2) moves through the pipe: the pipe is grown to this where the system
#: allows (`fs.pipe-max-size`, 1 MiB by default); each write into the file then holds its
#: inode lock for at most this much, like `localfs.pwrite_all`'s pieces.
SPLICE_PIECE = 1 << 20
_F_SETPIPE_SZ = 1031


def splice_exact(
    fp: io.BufferedReader,
    sock: socket.socket,
    pipe: tuple[int, int],
    fd: int,
    offset: int,
    length: int,
    landed: Callable[[int], None],
) -> int:
    """Move the next *length* bytes of a response body into file *fd* at *offset*: those
    already in *fp*'s buffer by pwrite, the rest by splice(2) from *sock* through *pipe*
    (empty, the caller's) into the file, never through user space: that saves copying each
    byte out of the socket, ~0.15 s of a core per GiB on this kind of machine. *landed*(n)
    after each piece is in the file. Returns the count: short only at end of stream.

    The connection's trouble (reset, the read timeout, which still applies as SO_RCVTIMEO)
    raises FastPathError; the file's (ENOSPC, EIO) raises its OSError. After either, the
    connection is mid-body and the pipe may hold bytes: neither may be reused."""
    done = 0
    try:
        buffered = fp.peek(1)[:length] if length else b""
        data = fp.read(len(buffered)) if buffered else b""
    except (OSError, ValueError) as exc:
        raise FastPathError(f"GET transport: {exc}") from exc
    view = memoryview(data)
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"wrote nothing at byte {offset + done} (disk full?)")
        done += n
        landed(n)
    timeout = sock.gettimeout()
    read_end, write_end = pipe
    try:
        sock.settimeout(None)  # splice from a non-blocking socket would return EAGAIN
        seconds = timeout or 0.0
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        while done < length:
            try:
                n = os.splice(
                    sock.fileno(),
                    write_end,
                    min(SPLICE_PIECE, length - done),
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE,
                )
            except BlockingIOError as exc:
                raise FastPathError(f"GET: no data from the server for {timeout} s") from exc
            except OSError as exc:
                raise FastPathError(f"GET transport: {exc}") from exc
            if not n:
                break
            while n:
                m = os.splice(read_end, fd, n, offset_dst=offset + done, flags=os.SPLICE_F_MOVE)
                if m <= 0:
                    raise OSError(errno.ENOSPC, f"wrote nothing at byte {offset + done}")
                n -= m
                done += m
                landed(m)
    finally:
        sock.settimeout(timeout)
    return done


class SplicePipe:
    """One thread's pipe for `splice_exact`, grown to SPLICE_PIECE where the system allows.
    Closed when dropped (its thread ends, or an error left bytes in it), never by another
    thread: an fd closed under a splice in flight could be reused by an unrelated open."""

    def __init__(self) -> None:
        self.fds = os.pipe2(os.O_CLOEXEC)
        # Over fs.pipe-max-size the default 64 KiB pipe works, in more calls.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fds[1], _F_SETPIPE_SZ, SPLICE_PIECE)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # os.close bound at definition: at interpreter exit the module may be gone first.
        for fd in getattr(self, "fds", ()):  # none if pipe2 itself failed
            _close(fd)


class Conn:
    """One kept-alive connection and its buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.reusable = True
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self.rfile.close()
        finally:
            self.sock.close()


@dataclass(eq=False)
class Transport:
    """Kept-alive connections to one endpoint, one per thread; thread-safe."""

    host: str
    port: int
    _: KW_ONLY
    https: bool
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: TLS verification: the system's CAs, or the bundle the caller's settings name.
    ca_bundle: InitVar[str | None] = None
    #: False once the server closes connections after each answer.
    keepalive: bool = field(default=True, init=False)
    _local: threading.local = field(default_factory=threading.local, init=False)
    #: Every open connection, whichever thread it belongs to, for `close`.
    _conns: set[Conn] = field(default_factory=set, init=False)
    _conns_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self, ca_bundle: str | None) -> None:
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if self.https else None

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings of this endpoint (None for plain HTTP), for other transports to
        the same endpoint (the FUSE loop's, plugin.fusefs.loopio)."""
        return self._ssl

    def _call(
        self,
        what: str,
        request: bytes,
        *,
        payload: bytes = b"",
        body: bool = True,
        max_body: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send *request* (then *payload*) on this thread's connection and read the whole
        answer (a HEAD's has no body, whatever its Content-Length says). Observed."""
        started = time.monotonic()
        outcome = "error"
        try:
            conn, status, headers = self._send(what, request, payload)
            try:
                data = self._read_body(conn, headers, max_body) if body else b""
            except (OSError, ValueError) as exc:
                self._drop()
                raise FastPathError(f"{what} transport: {exc}") from exc
            except FastPathError:
                self._drop()
                raise
            if not conn.reusable:
                self._drop()
            outcome = answer_outcome(status, data)
            return status, headers, data
        finally:
            observe.record(operation_name(what), outcome, time.monotonic() - started)

    def _send(
        self, what: str, request: bytes, payload: bytes = b""
    ) -> tuple[Conn, int, dict[str, str]]:
        """Send *request* and *payload* on this thread's connection; (connection, status,
        headers) with the body still to read. A kept-alive connection the server closed
        meanwhile gets one fresh try."""
        conn = self._live_conn()
        for attempt in range(2):
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._connect()
                conn.sock.sendall(request)
                if payload:
                    conn.sock.sendall(payload)
                status, headers = self._read_response(conn)
                return conn, status, headers
            except (OSError, ValueError) as exc:
                self._drop()
                conn = None
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                raise FastPathError(f"{what} transport: {exc}") from exc
            except FastPathError:
                self._drop()
                raise
        raise FastPathError("unreachable")

    def _read_body(self, conn: Conn, headers: dict[str, str], max_body: int | None = None) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = conn.rfile.readline(1024)
                if not size_line:
                    raise ConnectionResetError("connection closed in a chunked body")
                size = chunk_size(size_line)
                if size == 0:
                    while conn.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                data = conn.rfile.read(size)
                if len(data) != size:
                    raise ConnectionResetError("short chunk")
                parts.append(data)
                conn.rfile.readline(8)
        length = headers.get("content-length")
        if length is None:
            raise FastPathError("body without a length")
        if max_body is not None and int(length) > max_body:
            raise FastPathError(f"body of {length} bytes is over {max_body}")
        data = conn.rfile.read(int(length))
        if len(data) != int(length):
            raise ConnectionResetError("short body")
        return data

    def _connect(self) -> Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self.read_timeout)
        conn = Conn(sock)
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _live_conn(self) -> Conn | None:
        """This thread's connection, unless `close` closed it meanwhile."""
        conn: Conn | None = getattr(self._local, "conn", None)
        return conn if conn is not None and not conn.closed else None

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (a thread's next request opens a new one)."""
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()

    def _read_response(self, conn: Conn) -> tuple[int, dict[str, str]]:
        status_line = conn.rfile.readline(8192)
        if not status_line:
            raise ConnectionResetError("connection closed by the server")
        version, status = parse_status_line(status_line)
        headers: dict[str, str] = {}
        while True:
            line = conn.rfile.readline(65536)
            if line in (b"\r\n", b"\n"):
                if closes_after(version, headers):
                    # One request per connection (e.g. an HTTP/1.0 server): no pipelining.
                    conn.reusable = False
                    self.keepalive = False
                return status, headers
            if not line:
                raise ConnectionResetError("connection closed in the headers")
            add_header(line, headers)


# -- the answer's head, parsed the same way by this transport and the FUSE loop's -----------


def parse_status_line(line: bytes) -> tuple[bytes, int]:
    """(HTTP version, status) of a status line; FastPathError if it is not one."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise FastPathError(f"bad status line {line[:80]!r}")
    return parts[0], int(parts[1])


def add_header(line: bytes, headers: dict[str, str]) -> None:
    """Add one header line to *headers* (names lower-cased)."""
    name, sep, value = line.decode("latin-1").partition(":")
    if not sep:
        raise FastPathError(f"bad header line {line[:80]!r}")
    headers[name.strip().lower()] = value.strip()


def closes_after(version: bytes, headers: dict[str, str]) -> bool:
    """Whether the server closes the connection after this answer."""
    connection = headers.get("connection", "").lower()
    return connection == "close" or (version == b"HTTP/1.0" and connection != "keep-alive")


def chunk_size(line: bytes) -> int:
    """The size on a chunked body's size line."""
    return int(line.split(b";", 1)[0].strip(), 16)
