"""docs/metrics.md lists exactly the series the daemon serves, with their types, and the
example alert rules use only documented series."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import yaml

from plugin.metrics.serving import ServingMetrics
from plugin.metrics.volumes import VolumeCollector

REPO = Path(__file__).parents[2]


class _Info:
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status


class EveryKindDriver:
    """One volume of each kind, so every series has samples."""

    statuses: ClassVar[dict[str, dict[str, Any]]] = {
        "s": {
            "backend": "local",
            "mounts": 1,
            "stage_in": {"state": "done", "bytes_done": 1},
            "stage_out": {"state": "done", "last_success": "2026-01-01T00:00:00Z"},
        },
        "f": {"backend": "s3", "mounts": 1, "fuse": "mounted", "pending_uploads": 0},
    }

    def list(self) -> list[tuple[str, str]]:
        return [(name, "/m") for name in self.statuses]

    def get(self, name: str) -> _Info:
        return _Info(self.statuses[name])


def served() -> dict[str, str]:
    metrics = ServingMetrics()
    metrics.registry.register(VolumeCollector(EveryKindDriver(), Path("/nonexistent")))  # type: ignore[arg-type]
    metrics.requests.observe("VolumeDriver.Get", "ok", 0.001)
    metrics.s3.observe("GetObject", "ok", 0.01)
    names = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        names[name] = family.type
    return names


def documented() -> dict[str, str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `(stowage_[a-z0-9_]+)` \| (\w+) \|", text, re.MULTILINE)
    return dict(rows)


def test_docs_list_every_series_with_its_type() -> None:
    assert documented() == served()


def test_example_alerts_use_documented_series() -> None:
    rules = yaml.safe_load((REPO / "examples" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 3
    series = set(documented())
    for alert in alerts:
        used = set(re.findall(r"stowage_[a-z0-9_]+", alert["expr"]))
        assert used and used <= series, alert["alert"]
    config = yaml.safe_load((REPO / "examples" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
