"""The harness itself: a private dockerd runs the offline busybox images, and stowage answers
as a legacy plugin under the session's driver name. If these fail, nothing else can pass."""

from __future__ import annotations

import pytest

from e2e.helpers import E2E, Calls

pytestmark = pytest.mark.docker


def test_container_runs_on_private_dockerd(e2e: E2E) -> None:
    out = e2e.run("--rm", e2e.image, "sh", "-c", "echo ok; id -u; ls /proc/net/dev >/dev/null")
    assert out.stdout.split() == ["ok", "0"]
    info = e2e.docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    assert info == str(e2e.dockerd.data_root), "the CLI must talk to the private daemon"


def test_images_have_user_1000_and_seeded_data(e2e: E2E) -> None:
    out = e2e.run("--rm", "--user", "1000:1000", e2e.images.data, "sh", "-c",
                  f"id -un; cat {e2e.images.seed_path}")  # fmt: skip
    assert out.stdout == "user\n" + e2e.images.seed_content


def test_driver_is_discovered_as_legacy_plugin(e2e: E2E, calls: Calls) -> None:
    name = e2e.create_volume(e2e.unique("smoke"))
    assert e2e.volumes()[name] == e2e.driver
    assert calls["Create"] == 1
