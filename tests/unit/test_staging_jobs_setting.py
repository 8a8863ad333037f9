"""The parallel file copies of a staging job are a daemon setting handed to the local backend,
not a number fixed in the stager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plugin.backends.local import LocalBackend
from plugin.backends.staged import jobs as jobs_mod
from plugin.records import VolumeRecord
from plugin.staging.engine import CopyOptions
from plugin.staging.progress import CopyResult


@pytest.mark.parametrize("jobs", [1, 7])
def test_stage_in_copies_with_the_jobs_the_daemon_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    seen: list[int] = []

    def copy(src: Any, dst: Any, options: CopyOptions, **_kw: Any) -> CopyResult:
        seen.append(options.jobs)
        return CopyResult()

    monkeypatch.setattr(jobs_mod, "copy", copy)
    allowed = tmp_path / "allowed"
    (allowed / "src").mkdir(parents=True)
    backend = LocalBackend(tmp_path / "root", allowed_paths=(allowed,), staging_jobs=jobs)
    record = VolumeRecord(
        name="v",
        backend="local",
        options={"stage_in": str(allowed / "src"), "prefetch": "true"},
        created_at="2026-01-01T00:00:00Z",
    )
    backend.create(record)
    assert backend.stager.wait_idle("v", 10)
    assert seen == [jobs]
    assert backend.status(record)["stage_in"]["state"] == "done"
