"""Counters of a FUSE process, published for the daemon's metrics (docs/metrics.md).

The FUSE process is not the daemon and serves no HTTP: it writes these counters as a small
JSON file in its volume's state directory every few seconds (atomically, not durably: a lost
update after a power cut only costs a scrape's freshness), and the daemon's collector reads
the file when Prometheus scrapes. Counters are plain ints: every increment happens on the trio
loop's thread.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from plugin.atomic import write_atomically

if TYPE_CHECKING:
    from plugin.fusefs.fs import S3Filesystem

log = logging.getLogger(__name__)

#: How often the file is rewritten; below Prometheus's usual 15 s scrape interval.
STATS_INTERVAL_S = 5.0


@dataclass
class FuseStats:
    bytes_read: int = 0  # returned to read(2) callers
    bytes_written: int = 0  # accepted from write(2) callers
    uploads: int = 0  # files uploaded (close/fsync, retries, journals of a previous run)
    bytes_uploaded: int = 0
    upload_failures: int = 0  # upload attempts that failed (the data stays in the cache)


def snapshot(fs: S3Filesystem) -> dict[str, int]:
    """What the file holds: the counters, files written but not yet uploaded, and our pid
    (so a reader can tell this run's counters from a previous run's)."""
    return {
        **dataclasses.asdict(fs.cache.stats),
        "dirty_files": len(fs.dirty_nodes()),
        "pid": os.getpid(),
    }


def write_stats(path: Path, fs: S3Filesystem) -> None:
    """One write; blocking (call it off the loop while the filesystem is serving)."""
    try:
        write_atomically(path, json.dumps(snapshot(fs)).encode() + b"\n", durable=False)
    except OSError as exc:
        log.debug("cannot write the stats file %s: %s", path, exc)


async def report_stats(fs: S3Filesystem, path: Path, interval: float = STATS_INTERVAL_S) -> None:
    """Background task of the mounted filesystem: rewrite the stats file every `interval`."""
    while True:
        data = json.dumps(snapshot(fs)).encode() + b"\n"  # on the loop: the counters' thread
        try:
            await trio.to_thread.run_sync(
                functools.partial(write_atomically, path, data, durable=False),
                abandon_on_cancel=True,
            )
        except OSError as exc:
            log.debug("cannot write the stats file %s: %s", path, exc)
        await trio.sleep(interval)
