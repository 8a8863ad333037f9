"""A private image registry on 127.0.0.1 (Debian's `docker-registry`, the distribution v2
server) so `docker plugin push/install/upgrade` can be exercised without the internet.

dockerd treats 127.0.0.0/8 registries as insecure (plain HTTP) by default, so no TLS or
daemon flags are needed. Storage is a temporary directory; the process dies with the test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from harness.s3servers import die_with_parent, free_port, stop_child

BINARY = "docker-registry"
#: Straight to loopback, whatever *_proxy the environment has.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Registry:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which(BINARY) is not None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def start(self, timeout: float = 20.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.base / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [BINARY, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_path.read_text()}")
            try:
                with _NO_PROXY.open(f"http://{self.address}/v2/", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"registry did not answer within {timeout}s: {self.log_path}")

    def stop(self) -> None:
        stop_child(self.proc)
