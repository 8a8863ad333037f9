"""Volumes, mounts, staging jobs and FUSE processes, read when Prometheus scrapes.

Nothing here is counted as it happens: the collector asks the driver what `docker volume
ls`/`inspect` would show (List, then Get's Status of each volume) and reads the counters each
FUSE process keeps in `<s3 state dir>/<volume>/fuse.stats.json` (plugin.fusefs.stats). A scrape
therefore costs what a Get of every volume costs (memory and a few stat calls, no network).

Label cardinality: `volume` appears only on per-volume series (staging, FUSE), so their count
is the number of volumes, which the operator chooses; every other label has a fixed set of
values (backend kinds, job states, directions).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from plugin.backends.fuseproc import STATS_FILE
from plugin.driver import VolumeDriver
from plugin.errors import PluginError
from plugin.names import encode_name

log = logging.getLogger(__name__)

JOB_STATES = ("none", "pending", "running", "done", "failed")
DIRECTIONS = ("stage_in", "stage_out")
#: Counters a FUSE process reports (plugin.fusefs.stats.FuseStats): (file key, series, help).
FUSE_COUNTERS = (
    ("bytes_read", "stowage_fuse_read_bytes", "Bytes returned to readers of an S3 volume."),
    ("bytes_written", "stowage_fuse_written_bytes", "Bytes written to an S3 volume."),
    ("uploads", "stowage_fuse_uploads", "Files an S3 volume's FUSE process uploaded."),
    (
        "bytes_uploaded",
        "stowage_fuse_uploaded_bytes",
        "Bytes uploaded by FUSE processes.",
    ),
    (
        "upload_failures",
        "stowage_fuse_upload_failures",
        "Uploads that failed (the data stays in the volume's cache and is retried).",
    ),
)


class VolumeCollector(Collector):
    def __init__(self, driver: VolumeDriver, s3_state_root: Path) -> None:
        self.driver = driver
        self.s3_state_root = s3_state_root

    def describe(self) -> list[Metric]:
        return []  # collected on demand; registering must not call the driver

    def collect(self) -> Iterator[Metric]:
        statuses: dict[str, dict[str, Any]] = {}
        for name, _mountpoint in self.driver.list():
            try:
                statuses[name] = self.driver.get(name).status
            except PluginError:  # removed since List
                continue
        yield from _volume_series(statuses)
        yield from _staging_series(statuses)
        yield from self._fuse_series(statuses)

    def _fuse_series(self, statuses: Mapping[str, dict[str, Any]]) -> Iterator[Metric]:
        up = _volume_gauge(
            "stowage_fuse_process_up",
            "1 while an S3 volume's FUSE process serves its mount, 0 once it died (a mounted "
            "volume whose process is gone); absent while the volume is not mounted.",
        )
        pending = _volume_gauge(
            "stowage_fuse_uploads_pending",
            "Files of an S3 volume whose upload failed and whose data waits in its cache.",
        )
        dirty = _volume_gauge(
            "stowage_fuse_dirty_files",
            "Files written to an S3 volume and not uploaded yet (its FUSE process's count).",
        )
        counters = {
            key: CounterMetricFamily(series, help_text, labels=("volume",))
            for key, series, help_text in FUSE_COUNTERS
        }
        for name, status in statuses.items():
            fuse = status.get("fuse")
            if status.get("backend") != "s3" or not isinstance(fuse, str):
                continue
            pending.add_metric([name], _number(status.get("pending_uploads")))
            if fuse == "mounted":
                up.add_metric([name], 1)
                stats = self._fuse_stats(name)
                dirty.add_metric([name], _number(stats.get("dirty_files")))
                for key, counter in counters.items():
                    counter.add_metric([name], _number(stats.get(key)))
            elif fuse.startswith("dead"):
                up.add_metric([name], 0)
        yield from (up, pending, dirty, *counters.values())

    def _fuse_stats(self, name: str) -> dict[str, Any]:
        path = self.s3_state_root / encode_name(name) / STATS_FILE
        try:
            stats = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}  # not written yet (a process of an older stowage writes none)
        return stats if isinstance(stats, dict) else {}


def _volume_gauge(name: str, help_text: str) -> GaugeMetricFamily:
    """A gauge family with one series per volume."""
    return GaugeMetricFamily(name, help_text, labels=("volume",))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _volume_series(statuses: Mapping[str, dict[str, Any]]) -> Iterator[Metric]:
    volumes: dict[str, int] = {}
    mounts: dict[str, int] = {}
    mounted: dict[str, int] = {}
    for status in statuses.values():
        backend = str(status.get("backend", "unknown"))
        count = int(_number(status.get("mounts")))
        volumes[backend] = volumes.get(backend, 0) + 1
        mounts[backend] = mounts.get(backend, 0) + count
        mounted[backend] = mounted.get(backend, 0) + (count > 0)
    families = (
        ("stowage_volumes", "Volumes known to the plugin, by backend.", volumes),
        (
            "stowage_active_mounts",
            "Active mounts (Docker mount IDs holding a volume), by backend.",
            mounts,
        ),
        ("stowage_mounted_volumes", "Volumes with at least one active mount, by backend.", mounted),
    )
    for series, help_text, values in families:
        family = GaugeMetricFamily(series, help_text, labels=("backend",))
        for backend in sorted({"local", "s3", *values}):
            family.add_metric([backend], values.get(backend, 0))
        yield family


def _staging_series(statuses: Mapping[str, dict[str, Any]]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "stowage_staging_jobs",
        "Staged volumes by direction and state of their job (none, pending, running, done, "
        "failed).",
        labels=("direction", "state"),
    )
    per_volume = {
        key: GaugeMetricFamily(f"stowage_staging_{key}", help_text, labels=("volume", "direction"))
        for key, help_text in (
            ("bytes_done", "Bytes the volume's current or last staging job moved or found done."),
            ("bytes_total", "Bytes the volume's current or last staging job has to move."),
            ("files_done", "Files the volume's current or last staging job moved or found done."),
            ("files_total", "Files the volume's current or last staging job has to move."),
            ("attempts", "Attempts of the volume's current or last staging job."),
        )
    }
    failed = GaugeMetricFamily(
        "stowage_staging_failed",
        "1 while the volume's last staging job in this direction failed.",
        labels=("volume", "direction"),
    )
    last_success = _volume_gauge(
        "stowage_stage_out_last_success_timestamp_seconds",
        "When the volume's last successful stage-out finished (Unix time).",
    )
    age = _volume_gauge(
        "stowage_stage_out_last_success_age_seconds",
        "Seconds since the volume's last successful stage-out finished.",
    )
    counts = {(d, s): 0 for d in DIRECTIONS for s in JOB_STATES}
    now = time.time()
    for name, status in statuses.items():
        for direction in DIRECTIONS:
            job = status.get(direction)
            if not isinstance(job, dict):
                continue
            state = job.get("state")
            if state in JOB_STATES:
                counts[(direction, state)] += 1
            for key, family in per_volume.items():
                family.add_metric([name, direction], _number(job.get(key)))
            failed.add_metric([name, direction], 1 if state == "failed" else 0)
            finished = _timestamp(job.get("last_success")) if direction == "stage_out" else None
            if finished is not None:
                last_success.add_metric([name], finished)
                age.add_metric([name], max(0.0, now - finished))
    for (direction, state), count in counts.items():
        jobs.add_metric([direction, state], count)
    yield from (jobs, *per_volume.values(), failed, last_success, age)


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
