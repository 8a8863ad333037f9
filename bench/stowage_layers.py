"""Where a stowage API call spends its time, measured in-process (no socket, no gunicorn).

Why: the socket benchmark gives one number per call. Timing the same calls at the driver and at
the WSGI app (Flask) splits that number into driver work, Flask + JSON encoding, and the rest
(gunicorn, the unix socket and the client), so a missed target points at the layer to fix.
Uses only stowage's wiring entry points; if those change, the report says "unavailable".
"""

from __future__ import annotations

import io
import json
import logging
import random
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Sample = Callable[[], object]


@dataclass
class LayerBlock:
    """p50/p99 (ms) per layer and operation at one volume count."""

    volumes: int
    rows: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


def _pcts(samples: list[float]) -> tuple[float, float]:
    values = sorted(samples)
    n = len(values)
    return values[max(0, round(0.5 * n + 0.5) - 1)], values[min(n - 1, round(0.99 * n + 0.5) - 1)]


def _time(fn: Sample, count: int) -> tuple[float, float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return _pcts(samples)


def _wsgi_post(app: Any, path: str, body: bytes) -> bytes:
    """One POST through the WSGI app, with the environ gunicorn would build."""
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SERVER_NAME": "plugin.moby.localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    chunks = app(environ, lambda _status, _headers, _exc_info=None: None)
    try:
        return b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def measure_layers(
    repo: Path, scratch: Path, checkpoints: list[int], counts: tuple[int, int, int], seed: int
) -> list[LayerBlock] | str:
    """Create volumes in-process up to each checkpoint and time Get, Mount+Unmount and List.

    `counts` is (gets, mount pairs, lists). Returns an explanation instead if stowage's
    internals cannot be wired up.
    """
    gets, mounts, lists = counts
    root = scratch / "layers-root"
    try:
        sys.path.insert(0, str(repo))
        from plugin.api import create_app
        from plugin.settings import Settings
        from plugin.wiring import build_driver

        logging.disable(logging.CRITICAL)  # the daemon runs at warning level; keep it quiet
        driver: Any = build_driver(Settings(root=root, socket_path=root / "unused.sock"))
        app: Any = create_app(driver)
    except Exception as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"
    rng = random.Random(seed)
    names: list[str] = []
    blocks: list[LayerBlock] = []
    try:
        for checkpoint in checkpoints:
            while len(names) < checkpoint:
                name = f"bench-{len(names):05d}"
                driver.create(name, None)
                names.append(name)
            blocks.append(_measure_block(driver, app, names, rng, gets, mounts, lists))
    except Exception as exc:
        return f"failed ({type(exc).__name__}: {exc})"
    finally:
        logging.disable(logging.NOTSET)
        close = getattr(driver, "close", None)
        if close is not None:
            close()
        shutil.rmtree(root, ignore_errors=True)
    return blocks


def _measure_block(
    driver: Any, app: Any, names: list[str], rng: random.Random, gets: int, mounts: int, lists: int
) -> LayerBlock:
    block = LayerBlock(volumes=len(names))

    def pick() -> str:
        return rng.choice(names)

    def driver_pair() -> None:
        name, mount_id = pick(), secrets.token_hex(32)
        driver.mount(name, mount_id)
        driver.unmount(name, mount_id)

    def wsgi_pair() -> None:
        name, mount_id = pick(), secrets.token_hex(32)
        body = (json.dumps({"Name": name, "ID": mount_id}) + "\n").encode()
        _wsgi_post(app, "/VolumeDriver.Mount", body)
        _wsgi_post(app, "/VolumeDriver.Unmount", body)

    def wsgi_get() -> bytes:
        return _wsgi_post(app, "/VolumeDriver.Get", (json.dumps({"Name": pick()}) + "\n").encode())

    list_body = _wsgi_post(app, "/VolumeDriver.List", b"{}\n")
    decoded = json.loads(list_body)
    block.rows["driver (registry + SQLite + backend)"] = {
        "Get": _time(lambda: driver.get(pick()), gets),
        "Mount+Unmount": _time(driver_pair, mounts),
        "List": _time(driver.list, lists),
    }
    block.rows["WSGI app (driver + Flask + JSON encode)"] = {
        "Get": _time(wsgi_get, gets),
        "Mount+Unmount": _time(wsgi_pair, mounts),
        "List": _time(lambda: _wsgi_post(app, "/VolumeDriver.List", b"{}\n"), lists),
    }
    block.rows["… of which json.dumps of the response"] = {
        "List": _time(lambda: json.dumps(decoded), lists),
    }
    return block
