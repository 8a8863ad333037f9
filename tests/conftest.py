"""Test tiers. Locally, a tier whose prerequisites are missing skips with a reason; with
CI=true a skip is turned into a failure, because there it means a missing install step."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The real-dockerd fixtures, shared by tests/e2e and tests/security. Registered here because
# pytest accepts `pytest_plugins` only in the top-level conftest, and registered once so that a
# session running both tiers starts one private dockerd, not one per tier.
pytest_plugins = ["harness.e2e_fixtures"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which hides a missing install step: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests that build S3 backends in this process may leave the FUSE launcher (a module-level
    fork server) running; stop it so no process or socket outlives the run."""
    from plugin.backends import fuseproc

    fuseproc.launcher.stop()
