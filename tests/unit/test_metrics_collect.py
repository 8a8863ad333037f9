"""The metrics' series, from the driver's view of volumes, the FUSE stats files, the API and
the S3 observer (docs/metrics.md lists them)."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY, CollectorRegistry

from plugin.api import create_app
from plugin.driver import VolumeDriver
from plugin.errors import VolumeNotFoundError
from plugin.fusefs.stats import FuseStats, report_stats, write_stats
from plugin.metrics.requests import RequestMetrics
from plugin.metrics.s3 import MAX_OPERATIONS, S3Metrics
from plugin.metrics.s3 import OUTCOMES as S3_OUTCOMES
from plugin.metrics.serving import ServingMetrics
from plugin.metrics.volumes import VolumeCollector
from plugin.names import encode_name


@dataclass
class _Info:
    status: dict[str, Any]


class FakeDriver:
    """List and Get, as VolumeDriver answers them."""

    def __init__(self, statuses: dict[str, dict[str, Any]]) -> None:
        self.statuses = statuses

    def list(self) -> list[tuple[str, str]]:
        return [(name, f"/m/{name}") for name in self.statuses]

    def get(self, name: str) -> _Info:
        if name not in self.statuses:
            raise VolumeNotFoundError(name)
        return _Info(self.statuses[name])


def job(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "state": state,
        "bytes_done": 0,
        "bytes_total": 0,
        "files_done": 0,
        "files_total": 0,
        "attempts": 0,
        "last_error": None,
        **extra,
    }


def collect(statuses: dict[str, dict[str, Any]], s3_root: Path) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VolumeCollector(FakeDriver(statuses), s3_root))  # type: ignore[arg-type]
    return registry


def test_volumes_mounts_and_staging(tmp_path: Path) -> None:
    statuses = {
        "plain": {"backend": "local", "mounts": 2},
        "idle": {"backend": "local", "mounts": 0},
        "run42": {
            "backend": "local",
            "mounts": 1,
            "stage_in": job(
                "running",
                bytes_done=300,
                bytes_total=1000,
                files_done=3,
                files_total=10,
                attempts=1,
            ),
            "stage_out": job("done", last_success="2020-01-01T00:00:00Z", attempts=1),
        },
        "broken": {"backend": "local", "mounts": 0, "stage_out": job("failed", attempts=5)},
    }
    r = collect(statuses, tmp_path)
    v = r.get_sample_value
    assert v("stowage_volumes", {"backend": "local"}) == 4
    assert v("stowage_volumes", {"backend": "s3"}) == 0
    assert v("stowage_active_mounts", {"backend": "local"}) == 3
    assert v("stowage_mounted_volumes", {"backend": "local"}) == 2
    assert v("stowage_staging_jobs", {"direction": "stage_in", "state": "running"}) == 1
    assert v("stowage_staging_jobs", {"direction": "stage_out", "state": "done"}) == 1
    assert v("stowage_staging_jobs", {"direction": "stage_out", "state": "failed"}) == 1
    assert v("stowage_staging_jobs", {"direction": "stage_in", "state": "failed"}) == 0
    labels = {"volume": "run42", "direction": "stage_in"}
    assert v("stowage_staging_bytes_done", labels) == 300
    assert v("stowage_staging_bytes_total", labels) == 1000
    assert v("stowage_staging_files_done", labels) == 3
    assert v("stowage_staging_files_total", labels) == 10
    assert v("stowage_staging_failed", {"volume": "broken", "direction": "stage_out"}) == 1
    assert v("stowage_staging_attempts", {"volume": "broken", "direction": "stage_out"}) == 5
    assert v("stowage_staging_failed", labels) == 0
    assert v("stowage_stage_out_last_success_timestamp_seconds", {"volume": "run42"}) == 1577836800
    age = v("stowage_stage_out_last_success_age_seconds", {"volume": "run42"})
    assert age is not None and age > 3600 * 24 * 365
    # A volume never staged out has no age (absent, not zero: an alert must not see "fresh").
    assert v("stowage_stage_out_last_success_age_seconds", {"volume": "broken"}) is None
    assert v("stowage_staging_bytes_done", {"volume": "plain", "direction": "stage_in"}) is None


def test_fuse_processes_from_status_and_stats_file(tmp_path: Path) -> None:
    statuses = {
        "live/one": {"backend": "s3", "mounts": 1, "fuse": "mounted", "pending_uploads": 2},
        "gone": {"backend": "s3", "mounts": 1, "fuse": "dead: the FUSE process is gone; see x"},
        "idle": {"backend": "s3", "mounts": 0, "fuse": "not mounted"},
    }
    state_dir = tmp_path / encode_name("live/one")
    state_dir.mkdir()
    counters = {
        "bytes_read": 10,
        "bytes_written": 4096,
        "uploads": 3,
        "bytes_uploaded": 4096,
        "upload_failures": 1,
        "dirty_files": 1,
        "pid": 1,
    }
    (state_dir / "fuse.stats.json").write_text(json.dumps(counters))
    v = collect(statuses, tmp_path).get_sample_value
    live = {"volume": "live/one"}
    assert v("stowage_fuse_process_up", live) == 1
    assert v("stowage_fuse_process_up", {"volume": "gone"}) == 0
    assert v("stowage_fuse_process_up", {"volume": "idle"}) is None
    assert v("stowage_fuse_uploads_pending", live) == 2
    assert v("stowage_fuse_uploads_pending", {"volume": "idle"}) == 0
    assert v("stowage_fuse_written_bytes_total", live) == 4096
    assert v("stowage_fuse_read_bytes_total", live) == 10
    assert v("stowage_fuse_uploads_total", live) == 3
    assert v("stowage_fuse_uploaded_bytes_total", live) == 4096
    assert v("stowage_fuse_upload_failures_total", live) == 1
    assert v("stowage_fuse_dirty_files", live) == 1
    assert v("stowage_volumes", {"backend": "s3"}) == 3


def test_a_missing_or_garbled_stats_file_counts_nothing(tmp_path: Path) -> None:
    statuses = {"a": {"backend": "s3", "mounts": 1, "fuse": "mounted"}}
    v = collect(statuses, tmp_path).get_sample_value
    assert v("stowage_fuse_written_bytes_total", {"volume": "a"}) == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fuse.stats.json").write_text('{"bytes_written": "lots"')
    assert collect(statuses, tmp_path).get_sample_value("stowage_fuse_process_up", {"volume": "a"})


def test_requests_by_endpoint_and_outcome(driver: VolumeDriver) -> None:
    registry = CollectorRegistry(auto_describe=False)
    metrics = RequestMetrics(registry)
    client = create_app(driver, metrics.wrap).test_client()
    assert client.post("/VolumeDriver.Create", json={"Name": "a"}).status_code == 200
    assert client.post("/VolumeDriver.Get", json={"Name": "missing"}).status_code == 500
    assert client.post("/no/such/thing", data=b"x").status_code == 404
    assert client.post("/VolumeDriver.Create", data=b"x" * (2 << 20)).status_code == 413
    v = registry.get_sample_value
    assert v("stowage_plugin_requests_total", {"endpoint": "VolumeDriver.Create", "outcome": "ok"})
    assert v("stowage_plugin_requests_total", {"endpoint": "VolumeDriver.Get", "outcome": "error"})
    assert v("stowage_plugin_requests_total", {"endpoint": "other", "outcome": "rejected"}) == 1
    create_rejected = {"endpoint": "VolumeDriver.Create", "outcome": "rejected"}
    assert v("stowage_plugin_requests_total", create_rejected) == 1
    count = v("stowage_plugin_request_duration_seconds_count", {"endpoint": "VolumeDriver.Create"})
    assert count == 2


def test_s3_requests_with_bounded_labels() -> None:
    registry = CollectorRegistry(auto_describe=False)
    s3 = S3Metrics(registry)
    s3.observe("GetObject", "ok", 0.02)
    s3.observe("GetObject", "NoSuchKey", 0.01)
    s3.observe("GetObject", "error", 1.5)
    s3.observe("PutObject", "SlowDown", 0.1)
    s3.observe("PutObject", "AccessDenied", 0.1)
    s3.observe("PutObject", "SomethingNew\nwith junk", 0.1)
    for n in range(MAX_OPERATIONS * 2):
        s3.observe(f"Op{n}", "ok", 0.001)
    s3.observe("bad operation name!", "ok", 0.001)
    s3.observe("PutObject", "ok", float("nan"))  # never raises into the S3 layer
    v = registry.get_sample_value
    for outcome in ("ok", "not_found", "error"):
        assert v("stowage_s3_requests_total", {"operation": "GetObject", "outcome": outcome}) == 1
    for outcome in ("throttled", "denied", "s3_error"):
        assert v("stowage_s3_requests_total", {"operation": "PutObject", "outcome": outcome}) == 1
    assert v("stowage_s3_request_duration_seconds_count", {"operation": "GetObject"}) == 3
    assert v("stowage_s3_requests_total", {"operation": "other", "outcome": "ok"})
    samples = [
        s.labels
        for metric in registry.collect()
        if metric.name == "stowage_s3_requests"
        for s in metric.samples
        if s.name.endswith("_total")
    ]
    assert len({labels["operation"] for labels in samples}) <= MAX_OPERATIONS + 1
    assert {labels["outcome"] for labels in samples} <= set(S3_OUTCOMES)


def test_served_over_http_from_a_registry_of_its_own(driver: VolumeDriver, tmp_path: Path) -> None:
    driver.create("vol", {})
    metrics = ServingMetrics()
    metrics.watch(driver, tmp_path / "s3")
    host, port = metrics.serve(("127.0.0.1", 0))
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    assert 'stowage_volumes{backend="local"} 1.0' in text
    assert "# TYPE stowage_plugin_requests_total counter" in text
    assert "# TYPE stowage_s3_request_duration_seconds histogram" in text
    assert REGISTRY.get_sample_value("stowage_volumes", {"backend": "local"}) is None


@dataclass
class _FakeCache:
    stats: FuseStats = field(default_factory=FuseStats)


class _FakeFs:
    def __init__(self) -> None:
        self.cache = _FakeCache()

    def dirty_nodes(self) -> list[object]:
        return [object()]


def test_fuse_stats_file_is_written_and_refreshed(tmp_path: Path) -> None:
    fs = _FakeFs()
    path = tmp_path / "fuse.stats.json"
    write_stats(path, fs)  # type: ignore[arg-type]
    assert json.loads(path.read_text())["bytes_written"] == 0
    fs.cache.stats.bytes_written = 123
    fs.cache.stats.uploads = 2

    async def run_briefly() -> None:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report_stats, fs, path, 0.05)
                while json.loads(path.read_text())["bytes_written"] != 123:
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()

    trio.run(run_briefly)
    written = json.loads(path.read_text())
    assert written["bytes_written"] == 123 and written["uploads"] == 2
    assert written["dirty_files"] == 1 and written["pid"] > 0
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("bad", [b"", b"[]", b"null"])
def test_stats_file_that_is_not_an_object_is_ignored(tmp_path: Path, bad: bytes) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "fuse.stats.json").write_bytes(bad)
    statuses = {"v": {"backend": "s3", "mounts": 1, "fuse": "mounted"}}
    v = collect(statuses, tmp_path).get_sample_value
    assert v("stowage_fuse_uploads_total", {"volume": "v"}) == 0
