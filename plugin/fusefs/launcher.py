"""Fork server for FUSE processes: `python -m plugin.fusefs.launcher CONTROL_FD`.

Why: a fresh `python -m plugin.fusefs` spends most of a mount importing trio, pyfuse3 and
boto3. This process does those imports once, then forks one child per mounted volume; the
child skips straight to `plugin.fusefs.__main__.main`. Nothing here starts a thread or an
event loop before forking (the children run trio and worker threads of their own).

Protocol on CONTROL_FD (an AF_UNIX SOCK_SEQPACKET socket from the daemon; one message per
datagram, JSON):
- launcher → daemon, once the imports are done: `{"launcher": PID}`.
- daemon → launcher: `{"args": [...], "env": {...}, "mountpoint": "...", "exit_file": "..."}`
  with two descriptors attached (SCM_RIGHTS): the write end of the readiness pipe (the
  child's `--ready-fd`) and the log file (the child's stdout and stderr). Arguments are those
  of `python -m plugin.fusefs`; credentials travel only in `env`, as they would to a spawned
  process, never in arguments.
- launcher → daemon: `{"pid": PID}` or `{"error": "..."}`.

A child runs in its own session, like a spawned FUSE process: it outlives the launcher and
the daemon, and a restarted daemon adopts it through its pid file. The launcher reaps its
children and writes each one's exit status to its `exit_file` (`fuse.exit`), since the
daemon cannot wait for a grandchild. It exits when the daemon closes the socket (the daemon
exited or gave up on it); its children keep running.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

#: Largest request accepted (the environment is most of it).
MAX_MESSAGE = 1 << 20


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _set_name(name: bytes) -> None:
    """The process name `ps` and `top` show (prctl PR_SET_NAME): the children are forks of
    the launcher and would otherwise show its name."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)


class Launcher:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: Children not yet reaped: pid -> the file their exit status goes to.
        self.exit_files: dict[int, str] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
        _send(self.sock, {"launcher": os.getpid()})
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
                self.reap()
            if self.sock.fileno() in ready:
                try:
                    msg, fds = _recv(self.sock)
                except ConnectionError:
                    msg, fds = b"", []
                if not msg:
                    for fd in fds:
                        os.close(fd)
                    break  # the daemon is gone: our children stay, in their own sessions
                try:
                    self.handle(msg, fds)
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        self.reap()
        return 0

    def handle(self, msg: bytes, fds: list[int]) -> None:
        try:
            request = json.loads(msg)
            args = [str(a) for a in request["args"]]
            env = {str(k): str(v) for k, v in request["env"].items()}
            mountpoint = str(request["mountpoint"])
            exit_file = str(request["exit_file"])
            ready_fd, log_fd = fds
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _send(self.sock, {"error": f"bad request: {exc!r}"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            status = 2
            try:
                status = self.child([*args, "--ready-fd", str(ready_fd), mountpoint], env, log_fd)
            except SystemExit as exc:  # argparse
                status = exc.code if isinstance(exc.code, int) else 2
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        self.exit_files[pid] = exit_file
        _send(self.sock, {"pid": pid})

    def child(self, argv: list[str], env: dict[str, str], log_fd: int) -> int:
        """In the forked child: become a FUSE process exactly as a spawned one would be."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # survives the daemon's restart and its signals
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(env)
        _set_name(b"stowage-fusefs")
        sys.argv = ["python -m plugin.fusefs", *argv]
        from plugin.fusefs import __main__ as fusefs_main

        return fusefs_main.main(argv)

    def reap(self) -> None:
        while self.exit_files:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.exit_files.clear()
                return
            if pid == 0:
                return
            exit_file = self.exit_files.pop(pid, None)
            if exit_file is not None:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    Path(exit_file).write_text(f"last exit status {code}\n")


def preload() -> None:
    """What every FUSE process needs, imported once before any fork: trio, pyfuse3, the
    filesystem, and boto3 (whose client a child builds after it is mounted)."""
    import plugin.fusefs.__main__
    import plugin.s3.client  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m plugin.fusefs.launcher CONTROL_FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon ends us by closing the socket
    preload()
    return Launcher(sock).serve()


if __name__ == "__main__":
    sys.exit(main())
