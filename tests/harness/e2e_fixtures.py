"""Fixtures for the real-dockerd tiers (tests/e2e, tests/security): a private dockerd, offline
test images, and stowage running as a legacy plugin under a per-session driver name.

Registered once for the whole session by `pytest_plugins` in tests/conftest.py (pytest allows
that only in the top-level conftest), not by each tier's conftest: a session fixture defined in
two conftest files would be two fixtures, and a run of both tiers would start two dockerds.
Nothing here starts until a test requests a fixture, so other tiers pay only the import.

Why a unique driver name (`stowage-e2e-<pid>`): legacy plugins are discovered by socket name in
the host-wide /run/docker/plugins, so a fixed name would collide with a user's real stowage.

Teardown order (reverse of setup): containers and volumes are removed while both daemons are up,
then dockerd (which unmounts through the plugin), then stowage, then leftover mounts and files.
Set STOWAGE_E2E_KEEP=1 to keep the session directory (logs, state) for debugging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.helpers import E2E, Calls, missing_prerequisite, remove_everything

from harness import s3servers
from harness.daemon import StowageDaemon
from harness.dockerd import (
    Dockerd,
    kill_and_wait,
    pids_with_cmdline_containing,
    unmount_under,
    with_descendants,
)
from harness.images import TestImages, build_test_images
from harness.s3servers import S3Server

log = logging.getLogger(__name__)

PLUGINS_DIR = Path("/run/docker/plugins")
TMP_PARENT = "/tmp"
SESSION_PREFIX = "stw-e2e-"
OWNER_FILE = "owner.pid"
KEEP_FILE = "keep"
MUTATING = ("Create", "Remove", "Mount", "Unmount")


def _rmdir_if_created(path: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()


# -- session fixtures -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_sessions() -> None:
    """Clean up after sessions that died without teardown (SIGKILL, OOM kill of the runner).

    A session directory records its pytest pid; if that process is gone, every process naming
    the directory (dockerd, containerd, shims, stowage) is ours to kill, then its mounts go.
    """
    for base in Path(TMP_PARENT).glob(f"{SESSION_PREFIX}*"):
        try:
            owner = int((base / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        log.warning("cleaning up stale e2e session %s (pytest pid %s is gone)", base, owner)
        kill_and_wait(with_descendants(pids_with_cmdline_containing(f"{base}/")))
        try:
            Dockerd(base / "dk", remove_base=False).stop()
        except RuntimeError as exc:
            log.warning("stale session %s: %s", base, exc)
        for suffix in ("", "-canary"):
            (PLUGINS_DIR / f"stowage-e2e-{owner}{suffix}.sock").unlink(missing_ok=True)
        if not unmount_under(base) and not (base / KEEP_FILE).exists():
            shutil.rmtree(base, ignore_errors=True)


def _interrupt_on_sigterm(signum: int, _frame: object) -> None:
    """CI timeouts send SIGTERM; as KeyboardInterrupt, pytest still runs every finalizer."""
    raise KeyboardInterrupt(f"received signal {signum}")


@pytest.fixture(scope="session")
def e2e_base() -> Iterator[Path]:
    """Session directory, short because it holds unix sockets (108-byte limit)."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    reap_stale_sessions()
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    base = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX, dir=TMP_PARENT))
    (base / OWNER_FILE).write_text(str(os.getpid()))
    keep = bool(os.environ.get("STOWAGE_E2E_KEEP"))
    if keep:
        (base / KEEP_FILE).touch()
    try:
        yield base
    finally:
        signal.signal(signal.SIGTERM, previous)
        still_mounted = unmount_under(base)
        if keep:
            log.warning("keeping %s (STOWAGE_E2E_KEEP)", base)
        elif not still_mounted:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def driver_name() -> str:
    return f"stowage-e2e-{os.getpid()}"


@pytest.fixture(scope="session")
def allowed_dir(e2e_base: Path) -> Path:
    """The one --allowed-path of the session's stowage: path= volumes and stage_in host
    sources live below it; tests/security puts its sentinels beside it, outside."""
    allowed = e2e_base / "allowed"
    allowed.mkdir()
    return allowed


@pytest.fixture(scope="session")
def stowage(e2e_base: Path, driver_name: str, allowed_dir: Path) -> Iterator[StowageDaemon]:
    """stowage as a legacy plugin: dockerd finds /run/docker/plugins/<driver>.sock by name."""
    created_run_docker = not PLUGINS_DIR.parent.exists()
    created_plugins = not PLUGINS_DIR.exists()
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    socket_path = PLUGINS_DIR / f"{driver_name}.sock"
    root = e2e_base / "stowage"
    # The daemon's side of S3 credentials (for the S3 volume tests): the standard AWS chain
    # reads them from its environment; they never appear in volume options.
    daemon = StowageDaemon(
        socket_path,
        root,
        e2e_base / "stowage.log",
        allowed_paths=(allowed_dir,),
        env=s3servers.aws_env({}),
    )
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.stop()
        finally:
            daemon.kill()
            socket_path.unlink(missing_ok=True)
            unmount_under(root)
            _rmdir_if_created(PLUGINS_DIR, created_plugins)
            _rmdir_if_created(PLUGINS_DIR.parent, created_run_docker)


@pytest.fixture(scope="session")
def s3_server(e2e_base: Path) -> Iterator[S3Server]:
    """`rclone serve s3` on loopback for the S3 volume tests."""
    with s3servers.running_server("rclone", e2e_base / "s3") as server:
        yield server


@pytest.fixture(scope="session")
def canary(e2e_base: Path, driver_name: str) -> Iterator[StowageDaemon]:
    """A second legacy plugin standing in for a user's real stowage in /run/docker/plugins.

    dockerd scans every legacy plugin for some operations (e.g. `volume ls` without a driver
    filter, `volume inspect` of an unknown name), so a careless cleanup could Remove a user's
    volumes. After the session the canary must have seen no mutating call at all.
    """
    socket_path = PLUGINS_DIR / f"{driver_name}-canary.sock"
    daemon = StowageDaemon(socket_path, e2e_base / "canary", e2e_base / "canary.log")
    try:
        daemon.start()
        # A volume of its own, so an unfiltered cleanup would have something to Remove.
        client = daemon.client()
        try:
            assert not client.create("users-precious-volume").get("Err")
        finally:
            client.close()
        baseline = {e: daemon.count_requests(f"VolumeDriver.{e}") for e in MUTATING}
        yield daemon
    finally:
        try:
            daemon.stop()
        finally:
            daemon.kill()
            socket_path.unlink(missing_ok=True)
    touched = {
        endpoint: daemon.count_requests(f"VolumeDriver.{endpoint}") - baseline[endpoint]
        for endpoint in MUTATING
    }
    assert not any(touched.values()), f"the tests changed a foreign plugin: {touched}"


@pytest.fixture(scope="session")
def dockerd(
    e2e_base: Path, driver_name: str, stowage: StowageDaemon, canary: StowageDaemon
) -> Iterator[Dockerd]:
    """The private dockerd; requests `stowage` so it starts after and stops before the plugin."""
    level = os.environ.get("STOWAGE_E2E_DOCKERD_LOG_LEVEL", "info")
    daemon = Dockerd(e2e_base / "dk", log_level=level, remove_base=False)
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            if daemon.running:
                remove_everything(daemon, driver_name)
        finally:
            daemon.stop()


@pytest.fixture(scope="session")
def images(dockerd: Dockerd) -> TestImages:
    return build_test_images(dockerd)


@pytest.fixture
def e2e(
    dockerd: Dockerd,
    stowage: StowageDaemon,
    driver_name: str,
    images: TestImages,
    allowed_dir: Path,
) -> Iterator[E2E]:
    """A clean slate per test: both daemons up before, no containers or volumes after."""
    if stowage.proc is None or stowage.proc.poll() is not None:
        log.warning("stowage was down at test start (a previous test killed it); restarting")
        stowage.start()
    if not dockerd.running:
        log.warning("dockerd was down at test start; restarting")
        dockerd.start()
    yield E2E(dockerd, stowage, driver_name, images, allowed_dir)
    if stowage.proc is None or stowage.proc.poll() is not None:
        stowage.start()
    if dockerd.running:
        remove_everything(dockerd, driver_name)


@pytest.fixture
def calls(stowage: StowageDaemon, e2e: E2E) -> Calls:
    """Plugin call counters starting at zero for this test (after `e2e` checked the daemons)."""
    return Calls(stowage)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """On failure, attach the tails of the stowage and dockerd logs to the report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    env = funcargs.get("e2e")
    if isinstance(env, E2E):
        report.sections.append(("stowage log (tail)", env.stowage.log_text()[-6000:]))
        report.sections.append(("dockerd log (tail)", env.dockerd.log_text()[-4000:]))
