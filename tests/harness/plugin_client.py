"""A minimal client for the Docker volume plugin protocol over a unix socket.

It speaks exactly like dockerd: POST, no Content-Type, Go-style bodies with a trailing newline.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class PluginClient:
    """Calls a volume plugin the way dockerd does; keeps one connection alive."""

    def __init__(self, socket_path: str, timeout: float = 130.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _UnixHTTPConnection | None = None

    def __enter__(self) -> PluginClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def raw(self, path: str, body: bytes | None) -> tuple[int, bytes]:
        """POST raw bytes; returns (HTTP status, response body)."""
        for attempt in range(2):
            if self._conn is None:
                self._conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            headers = {"Accept": "application/vnd.docker.plugins.v1.2+json"}
            try:
                self._conn.request("POST", path, body=body or b"", headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the server closed; retry once on a fresh one.
                self.close()
                if attempt:
                    raise
                continue
            except OSError:
                self.close()
                raise
            except http.client.HTTPException as exc:
                # A reply cut short (the daemon died mid-response): a dropped connection.
                self.close()
                raise ConnectionError(f"{path}: reply cut short: {exc!r}") from exc
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def call(self, method: str, payload: Any = None) -> dict[str, Any]:
        """Call `/<method>` with a JSON payload (None sends an empty body, like Activate)."""
        body = None if payload is None else (json.dumps(payload) + "\n").encode()
        _status, data = self.raw("/" + method, body)
        decoded: dict[str, Any] = json.loads(data)
        return decoded

    # Convenience wrappers, named after the protocol endpoints.
    def create(self, name: str, opts: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("VolumeDriver.Create", {"Name": name, "Opts": opts})

    def remove(self, name: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Remove", {"Name": name})

    def mount(self, name: str, mount_id: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})

    def unmount(self, name: str, mount_id: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})

    def get(self, name: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Get", {"Name": name})

    def path(self, name: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Path", {"Name": name})

    def list(self) -> dict[str, Any]:
        return self.call("VolumeDriver.List", {})

    def capabilities(self) -> dict[str, Any]:
        return self.call("VolumeDriver.Capabilities", {})

    def activate(self) -> dict[str, Any]:
        return self.call("Plugin.Activate", None)
