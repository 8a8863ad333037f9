"""A stable identity for this host in the registry: its hostname plus a random id kept under
--root. The hostname alone is not enough (cloned VMs, containers named alike); the random part
alone would tell an operator nothing in "held by host ..." messages."""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

from plugin.atomic import write_atomically

HOST_ID_FILE = "host-id"


def host_id(root: Path) -> str:
    """Read `<root>/host-id`, or make it once (atomically: a crash leaves none or a whole one)."""
    path = root / HOST_ID_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:48] or "host"
    value = f"{name}-{secrets.token_hex(4)}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, (value + "\n").encode(), mode=0o644)
    return value
