"""`stowage serve --metrics`: a real daemon scraped over HTTP while a staged volume stages in
and out and while a container-like writer writes to an S3 volume through FUSE; the series that
docs/metrics.md documents move. Also `--log-format json` across the daemon and its FUSE
processes, and a clear refusal of an address in use."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import s3servers
from harness.daemon import StowageDaemon, stowage_executable
from harness.s3servers import S3Server
from prometheus_client.parser import text_string_to_metric_families

from plugin.backends import mounts
from plugin.backends.fuseproc import FuseProcess

rclone_server = s3servers.rclone_server

MiB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def wait_served(self, daemon: StowageDaemon, timeout: float = 20.0) -> None:
        """The socket answers once gunicorn's master listens; metrics once its worker runs."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.scrape()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"no metrics at {self.url}: {daemon.log_text()[-3000:]}"
                    ) from None
                time.sleep(0.05)

    def wait(self, check: Callable[[Samples], bool], what: str, timeout: float = 30.0) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if check(samples):
                return samples
            if time.monotonic() > deadline:
                stowage = {
                    k: v
                    for k, v in samples.items()
                    if k[0].startswith("stowage_") and not k[0].endswith(("_bucket", "_created"))
                }
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}: {stowage}"
                )
            time.sleep(0.1)


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(str(tmp_path_factory.mktemp("m", numbered=True)))


@pytest.fixture
def metrics_daemon(workdir: Path) -> Iterator[tuple[StowageDaemon, Scraper]]:
    if os.geteuid() != 0:
        pytest.skip("the daemon tests need root (mounts)")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    port = s3servers.free_port()
    daemon = StowageDaemon(
        socket_path=workdir / "stowage.sock",
        root=workdir / "root",
        log_path=workdir / "stowage.log",
        extra_args=("--metrics", f"127.0.0.1:{port}"),
        env={**s3servers.aws_env(), "STOWAGE_LOG_FORMAT": "json"},
    )
    daemon.start()
    scraper = Scraper(port)
    try:
        scraper.wait_served(daemon)
        yield daemon, scraper
    finally:
        daemon.kill()
        _stop_fuse_processes(workdir / "root")


def _stop_fuse_processes(root: Path) -> None:
    """FUSE processes outlive a killed daemon (their own session): stop them and their mounts."""
    state_root = root / "s3"
    for state_dir in state_root.glob("*") if state_root.exists() else []:
        FuseProcess(state_dir, root / "mounts" / state_dir.name).stop(timeout=20)
    for mountpoint in (root / "mounts").glob("*") if (root / "mounts").exists() else []:
        with contextlib.suppress(OSError):
            if mounts.is_mountpoint(mountpoint):
                mounts.lazy_unmount(mountpoint)


def s3_requests(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "stowage_s3_requests_total")


def test_scraped_during_stage_in_and_stage_out(
    metrics_daemon: tuple[StowageDaemon, Scraper], rclone_server: S3Server, tmp_path: Path
) -> None:
    daemon, scraper = metrics_daemon
    bucket = rclone_server.new_bucket()
    s3 = rclone_server.client()
    for n in range(24):
        s3.put_object(Bucket=bucket, Key=f"in/f{n:02d}", Body=os.urandom(MiB // 2))
    client = daemon.client()
    before = scraper.scrape()
    opts = {
        "stage_in": f"s3://{bucket}/in",
        "stage_out": f"s3://{bucket}/out",
        "endpoint": rclone_server.endpoint,
        "prefetch": "true",
        "stage_bwlimit": "3M",  # 12 MiB take about 4 s: long enough to scrape a running job
    }
    assert client.create("run42", opts)["Err"] == ""
    labels = {"volume": "run42", "direction": "stage_in"}

    running = scraper.wait(
        lambda s: (
            get(s, "stowage_staging_jobs", direction="stage_in", state="running") == 1
            and 0 < get(s, "stowage_staging_bytes_done", **labels) < 12 * MiB
        ),
        "a running stage-in with some bytes done",
    )
    assert get(running, "stowage_staging_bytes_total", **labels) == 12 * MiB
    assert get(running, "stowage_staging_files_total", **labels) == 24
    done = scraper.wait(
        lambda s: get(s, "stowage_staging_jobs", direction="stage_in", state="done") == 1,
        "stage-in done",
    )
    assert get(done, "stowage_staging_bytes_done", **labels) == 12 * MiB
    assert get(done, "stowage_staging_files_done", **labels) == 24
    assert get(done, "stowage_staging_bytes_done", **labels) > get(
        running, "stowage_staging_bytes_done", **labels
    )
    assert get(done, "stowage_staging_failed", **labels) == 0
    assert (
        "stowage_stage_out_last_success_age_seconds",
        frozenset({("volume", "run42")}),
    ) not in done

    # A container writes, lets go, and stage-out uploads in the background.
    mountpoint = Path(client.mount("run42", "c1")["Mountpoint"])
    (mountpoint / "result.bin").write_bytes(os.urandom(MiB))
    assert client.unmount("run42", "c1")["Err"] == ""
    out = scraper.wait(
        lambda s: get(s, "stowage_staging_jobs", direction="stage_out", state="done") == 1,
        "stage-out done",
    )
    assert get(out, "stowage_staging_bytes_done", volume="run42", direction="stage_out") >= MiB
    age = out[("stowage_stage_out_last_success_age_seconds", frozenset({("volume", "run42")}))]
    assert 0 <= age < 60
    assert get(out, "stowage_volumes", backend="local") == 1
    assert get(out, "stowage_active_mounts", backend="local") == 0
    ok_mounts = {"endpoint": "VolumeDriver.Mount", "outcome": "ok"}
    assert get(out, "stowage_plugin_requests_total", **ok_mounts) == 1 + get(
        before, "stowage_plugin_requests_total", **ok_mounts
    )
    assert get(out, "stowage_plugin_request_duration_seconds_count", endpoint="VolumeDriver.Create")
    if importlib.util.find_spec("plugin.s3.observe") is not None:
        assert s3_requests(out) > s3_requests(before)


def test_scraped_during_a_fuse_write(
    metrics_daemon: tuple[StowageDaemon, Scraper], rclone_server: S3Server, workdir: Path
) -> None:
    daemon, scraper = metrics_daemon
    bucket = rclone_server.new_bucket()
    rclone_server.client().put_object(Bucket=bucket, Key="seed.bin", Body=os.urandom(MiB))
    client = daemon.client()
    opts = {"backend": "s3", "bucket": bucket, "endpoint": rclone_server.endpoint}
    assert client.create("data", opts)["Err"] == ""
    mountpoint = Path(client.mount("data", "c1")["Mountpoint"])
    vol = {"volume": "data"}
    assert scraper.wait(
        lambda s: get(s, "stowage_fuse_process_up", **vol) == 1, "the FUSE process up"
    )
    assert (mountpoint / "seed.bin").stat().st_size == MiB
    with open(mountpoint / "out.bin", "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.flush()
        # Past the kernel's writeback cache: the FUSE process sees the writes and uploads.
        os.fsync(f.fileno())
        writing = scraper.wait(
            lambda s: (
                get(s, "stowage_fuse_written_bytes_total", **vol) >= 3 * MiB
                and get(s, "stowage_fuse_uploads_total", **vol) >= 1
            ),
            "written bytes and the fsync's upload counted while the file is open",
        )
        assert get(writing, "stowage_fuse_uploaded_bytes_total", **vol) >= 3 * MiB
        assert get(writing, "stowage_active_mounts", backend="s3") == 1
        f.write(os.urandom(MiB))
    assert len((mountpoint / "seed.bin").read_bytes()) == MiB
    after = scraper.wait(
        lambda s: (
            get(s, "stowage_fuse_uploads_total", **vol) >= 2
            and get(s, "stowage_fuse_written_bytes_total", **vol) >= 4 * MiB
            and get(s, "stowage_fuse_read_bytes_total", **vol) >= MiB
        ),
        "the upload at close and the read counted",
    )
    assert get(after, "stowage_fuse_uploaded_bytes_total", **vol) >= 7 * MiB
    assert get(after, "stowage_fuse_dirty_files", **vol) == 0
    assert get(after, "stowage_fuse_upload_failures_total", **vol) == 0
    assert get(after, "stowage_fuse_uploads_pending", **vol) == 0

    # The FUSE process logs in the daemon's format.
    fuse_log = workdir / "root" / "s3" / "data" / "fuse.log"
    entries = [json.loads(line) for line in fuse_log.read_text().splitlines() if line.strip()]
    assert any("uploaded out.bin" in e["message"] for e in entries)

    # It dies under the mount: the series says so until the next Mount repairs it.
    pid = int((workdir / "root" / "s3" / "data" / "fuse.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    scraper.wait(lambda s: get(s, "stowage_fuse_process_up", **vol) == 0, "the FUSE process dead")
    assert client.unmount("data", "c1")["Err"] == ""
    assert client.remove("data")["Err"] == ""
    gone = scraper.scrape()
    assert ("stowage_fuse_process_up", frozenset(vol.items())) not in gone


def test_daemon_logs_are_json_lines(metrics_daemon: tuple[StowageDaemon, Scraper]) -> None:
    daemon, scraper = metrics_daemon
    client = daemon.client()
    client.create("v", {})
    client.get("missing")
    assert get(
        scraper.scrape(),
        "stowage_plugin_requests_total",
        endpoint="VolumeDriver.Get",
        outcome="error",
    )
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"].startswith("request /VolumeDriver.Create") for e in entries)
    assert any("serving Prometheus metrics on http://127.0.0.1:" in e["message"] for e in entries)


def test_an_address_in_use_is_refused_at_start(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                *stowage_executable(),
                "serve",
                "--socket",
                str(workdir / "s.sock"),
                "--root",
                str(workdir / "root"),
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stdout + result.stderr
    assert not (workdir / "s.sock").exists()
