"""stowage as a managed (v2) plugin in the private dockerd: built by scripts/build-plugin, then
enabled, used, reconfigured, restarted and upgraded the way an operator would (protocol.md §2.2,
§2.3, §4 C/D; pitfalls P5 and P8).

The image build is the slow part, so it happens once per session (`managed` fixture); the
debootstrap base tarball is cached across sessions by build-plugin itself. State lives in a
host directory bound into the plugin (`state` mount), as in production, so upgrades keep it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import s3servers
from harness.daemon import StowageDaemon, socket_accepts
from harness.dockerd import DockerCommandError, Dockerd, mounts_under, unmount_under, wait_until
from harness.images import TestImages
from harness.registry import Registry
from harness.s3servers import S3Server

from e2e.helpers import E2E, remove_everything

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-plugin"
COMPOSE_EXAMPLE = REPO / "examples" / "compose" / "compose.yaml"
# Unique within the private dockerd, which is all a managed plugin's name must be.
PLUGIN = "stowage-managed:latest"
PROPAGATED_MOUNT = "/mnt/volumes"
HOST_PLUGIN_SOCKETS = Path("/run/docker/plugins")  # dockerd's plugin exec root, fixed on Linux
# No image registry here: build-plugin makes this base with debootstrap (cached tarball).
BASE_IMAGE = os.environ.get("STOWAGE_E2E_PLUGIN_BASE", "stowage-base:bookworm")
# First build ever: debootstrap (~2-3 min) + wheelhouse + image; later builds ~1.5 min.
BUILD_TIMEOUT = 900.0
S3_PROFILE = "e2e"


@dataclass
class Managed:
    """The session's managed plugin; `plugin_id` changes when a test reinstalls it."""

    dockerd: Dockerd
    name: str
    state_dir: Path
    credentials_dir: Path
    work: Path
    plugin_id: str = ""
    ids: tuple[str, ...] = ()  # every id it ever had, for teardown of host-side leftovers

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0) -> Any:
        return self.dockerd.docker(*args, check=check, timeout=timeout)

    def inspect(self) -> dict[str, Any]:
        result: list[dict[str, Any]] = self.dockerd.docker_json("plugin", "inspect", self.name)
        return result[0]

    def refresh_id(self) -> None:
        self.plugin_id = self.inspect()["Id"]
        self.ids = (*self.ids, self.plugin_id)

    @property
    def enabled(self) -> bool:
        return bool(self.inspect()["Enabled"])

    @property
    def socket(self) -> Path:
        return HOST_PLUGIN_SOCKETS / self.plugin_id / "stowage.sock"

    @property
    def host_mount_base(self) -> Path:
        """Where the PropagatedMount appears on the host, i.e. what containers bind."""
        return self.dockerd.data_root / "plugins" / self.plugin_id

    def build(self, timeout: float = BUILD_TIMEOUT) -> None:
        """scripts/build-plugin against the private dockerd (DOCKER_HOST), as a user runs it."""
        cmd = [
            str(BUILD_SCRIPT), self.name, "--base-image", BASE_IMAGE,
            "--state-dir", str(self.state_dir), "--credentials-dir", str(self.credentials_dir),
            "--out", str(self.plugin_dir),
        ]  # fmt: skip
        result = subprocess.run(
            cmd,
            env=self.dockerd.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        # Kept for a failed run: build-plugin prints each step with its elapsed time.
        with (self.work / "build-plugin.log").open("a") as log_file:
            log_file.write(result.stdout + result.stderr)
        assert result.returncode == 0, (
            f"build-plugin exited {result.returncode}\nstdout: {result.stdout[-3000:]}\n"
            f"stderr: {result.stderr[-3000:]}"
        )
        self.refresh_id()

    @property
    def plugin_dir(self) -> Path:
        """config.json + rootfs/ as build-plugin left them (`--out`), to create again."""
        return self.work / "plugin"

    def create_again(self) -> None:
        """What an upgrade does after `rm`: create from a plugin dir, point it at the state.

        STOWAGE_E2E_PLUGIN_REBUILD=1 runs the whole build-plugin again instead (~1.5 min).
        """
        if os.environ.get("STOWAGE_E2E_PLUGIN_REBUILD"):
            self.build()
            return
        self.docker("plugin", "create", self.name, str(self.plugin_dir), timeout=300)
        self.refresh_id()
        self.set(f"state.source={self.state_dir}", f"credentials.source={self.credentials_dir}")

    def enable(self) -> float:
        """`docker plugin enable`; returns how long it took (dockerd waits for the socket)."""
        start = time.monotonic()
        self.docker("plugin", "enable", self.name, timeout=60)
        return time.monotonic() - start

    def ensure_enabled(self) -> None:
        if not self.enabled:
            self.enable()

    def set(self, *settings: str) -> None:
        """`docker plugin set` (only allowed while disabled)."""
        self.docker("plugin", "set", self.name, *settings)

    def remove(self) -> None:
        """Force-disable and remove the plugin, then drop what it may leave on the host."""
        self.docker("plugin", "disable", "-f", self.name, check=False)
        self.docker("plugin", "rm", "-f", self.name, check=False)
        self.cleanup_host()

    def cleanup_host(self) -> None:
        for plugin_id in self.ids:
            unmount_under(self.dockerd.data_root / "plugins" / plugin_id)
            if not self.dockerd.running or not self._known(plugin_id):
                with contextlib.suppress(OSError):
                    shutil.rmtree(HOST_PLUGIN_SOCKETS / plugin_id)

    def _known(self, plugin_id: str) -> bool:
        out = self.docker("plugin", "ls", "-q", "--no-trunc", check=False).stdout
        return plugin_id in out.split()

    def dockerd_log_lines(self) -> list[str]:
        """dockerd's log lines carrying this plugin's stdout (tagged plugin=<id>)."""
        tag = f"plugin={self.plugin_id}"
        return [line for line in self.dockerd.log_text().splitlines() if tag in line]


def write_credentials(credentials_dir: Path) -> None:
    """The plugin's S3 credentials: `credentials` in the host directory bound as its
    `credentials` mount, one profile, mode 0600."""
    path = credentials_dir / "credentials"
    path.write_text(
        f"[{S3_PROFILE}]\naws_access_key_id = {s3servers.ACCESS_KEY}\n"
        f"aws_secret_access_key = {s3servers.SECRET_KEY}\n"
    )
    path.chmod(0o600)


@pytest.fixture(scope="module")
def managed(
    dockerd: Dockerd, images: TestImages, e2e_base: Path, s3_server: S3Server
) -> Iterator[Managed]:
    """Build, create and enable the plugin once for this module; remove it afterwards."""
    if not BUILD_SCRIPT.is_file():
        pytest.fail(f"{BUILD_SCRIPT} is missing")
    plugin = Managed(
        dockerd,
        PLUGIN,
        e2e_base / "managed-state",
        e2e_base / "managed-credentials",
        e2e_base / "managed",
    )
    plugin.work.mkdir(exist_ok=True)
    try:
        plugin.build()
        write_credentials(plugin.credentials_dir)
        # The default for S3 volumes without -o endpoint= (a settable env, like the log level).
        plugin.set(f"STOWAGE_S3_ENDPOINT={s3_server.endpoint}")
        plugin.enable()
        yield plugin
    finally:
        if dockerd.running:
            remove_everything(dockerd, PLUGIN)
            plugin.remove()
        else:
            plugin.cleanup_host()


@pytest.fixture
def mp(managed: Managed, dockerd: Dockerd, images: TestImages, allowed_dir: Path,
       stowage: StowageDaemon) -> Iterator[E2E]:  # fmt: skip
    """The usual E2E helpers, with the managed plugin as the driver; a clean slate after."""
    if not dockerd.running:
        dockerd.start()
    managed.ensure_enabled()
    yield E2E(dockerd, stowage, PLUGIN, images, allowed_dir)
    if dockerd.running:
        remove_everything(dockerd, PLUGIN)
        managed.ensure_enabled()


def assert_under_propagated_mount(e2e: E2E, volume: str) -> None:
    """Every Mountpoint must lie under the PropagatedMount (P5): Docker resolves it there."""
    mountpoint = e2e.inspect_volume(volume)["Mountpoint"]
    assert mountpoint.startswith(PROPAGATED_MOUNT + "/"), mountpoint


def write_then_read(e2e: E2E, volume: str, text: str) -> None:
    """One container writes, a second one (a fresh mount) reads it back."""
    e2e.run("--rm", "-v", f"{volume}:/data", e2e.image, "sh", "-c", f"echo {text} > /data/f")
    out = e2e.run("--rm", "-v", f"{volume}:/data", e2e.image, "cat", "/data/f").stdout
    assert out == f"{text}\n"


# -- tests ----------------------------------------------------------------------------------


def test_enable_accepts_on_the_socket_within_seconds(managed: Managed, mp: E2E) -> None:
    managed.docker("plugin", "disable", managed.name)
    assert not socket_accepts(managed.socket, timeout=1.0)
    took = managed.enable()
    # dockerd dials at ~0.5 s, then every 3 s; binding before recovery makes the first dial.
    assert took < 4.0, f"enable took {took:.1f}s: the socket was not up at the first dial"
    assert socket_accepts(managed.socket, timeout=1.0)
    info = managed.inspect()
    assert info["Enabled"] is True
    assert info["Config"]["Interface"]["Socket"] == "stowage.sock"
    assert info["Config"]["PropagatedMount"] == PROPAGATED_MOUNT


def test_local_volume_data_crosses_containers_under_the_propagated_mount(
    managed: Managed, mp: E2E
) -> None:
    volume = mp.create_volume(mp.unique("loc"), uid="1000", mode="0750")
    assert mp.volumes() == {volume: PLUGIN}
    assert_under_propagated_mount(mp, volume)
    write_then_read(mp, volume, "managed-local")
    out = mp.run("--rm", "-v", f"{volume}:/data", mp.image, "stat", "-c", "%u %a", "/data")
    assert out.stdout.split() == ["1000", "750"]

    # While a container has it mounted, the plugin's mount shows on the host under the
    # plugin's propagated mount, which is what dockerd binds into the container.
    container = mp.run("-d", "-v", f"{volume}:/data", mp.image, "sleep", "300").stdout.strip()
    host_mounts = mounts_under(managed.host_mount_base)
    assert any(m.endswith(f"/{volume}") for m in host_mounts), host_mounts
    mp.docker("rm", "-f", container)

    # The data lives in the state directory on the host, which upgrades keep.
    assert (managed.state_dir / "volumes" / volume / "data" / "f").read_text() == (
        "managed-local\n"
    )


@pytest.mark.s3
@pytest.mark.fuse
def test_s3_volume_over_host_network_with_profile_from_credentials_mount(
    managed: Managed, mp: E2E, s3_server: S3Server
) -> None:
    # Only the credentials mount holds keys (dockerd's test environment has none for S3).
    assert not (managed.state_dir / "credentials").exists()
    mounts = {m["Name"]: m for m in managed.inspect()["Settings"]["Mounts"]}
    assert mounts["credentials"]["Source"] == str(managed.credentials_dir)
    assert "ro" in mounts["credentials"]["Options"]
    bucket = s3_server.new_bucket()
    volume = mp.create_volume(
        mp.unique("s3"),
        backend="s3",
        bucket=bucket,
        prefix="app",
        endpoint=s3_server.endpoint,  # 127.0.0.1: reachable because the plugin is host-network
        profile=S3_PROFILE,
        dir_markers="false",  # rclone serve s3 cannot store `dir/` objects
    )
    assert_under_propagated_mount(mp, volume)
    write_then_read(mp, volume, "managed-s3")
    body = s3_server.client().get_object(Bucket=bucket, Key="app/f")["Body"].read()
    assert body == b"managed-s3\n"
    assert mp.inspect_volume(volume)["Status"]["backend"] == "s3"
    # No -o endpoint=: the plugin's STOWAGE_S3_ENDPOINT setting, recorded with the volume.
    same_data = mp.create_volume(
        mp.unique("s3-default"),
        backend="s3",
        bucket=bucket,
        prefix="app",
        profile=S3_PROFILE,
        dir_markers="false",
    )
    options = mp.inspect_volume(same_data)["Status"]["options"]
    assert options["endpoint"] == s3_server.endpoint
    out = mp.run("--rm", "-v", f"{same_data}:/data", mp.image, "cat", "/data/f").stdout
    assert out == "managed-s3\n"
    # A profile missing from the file: the error names the file as the plugin sees it.
    with pytest.raises(DockerCommandError, match="/etc/stowage/credentials"):
        mp.create_volume(
            mp.unique("s3-noprofile"),
            backend="s3",
            bucket=bucket,
            endpoint=s3_server.endpoint,
            profile="not-there",
        )


def test_disable_refused_while_volumes_exist_then_allowed(managed: Managed, mp: E2E) -> None:
    volume = mp.create_volume(mp.unique("use"))
    result = managed.docker("plugin", "disable", managed.name, check=False)
    assert result.returncode != 0
    assert "in use" in result.stderr
    assert managed.enabled
    mp.docker("volume", "rm", volume)
    managed.docker("plugin", "disable", managed.name)
    assert not managed.enabled
    managed.enable()


def test_log_level_set_while_disabled_takes_effect(managed: Managed, mp: E2E) -> None:
    def debug_lines() -> int:
        return sum(" DEBUG " in line for line in managed.dockerd_log_lines())

    volume = mp.create_volume(mp.unique("log"))
    mp.inspect_volume(volume)  # a Get, logged at DEBUG only
    before = debug_lines()
    assert before == 0, "the default level is info"
    mp.docker("volume", "rm", volume)
    managed.docker("plugin", "disable", managed.name)
    try:
        with pytest.raises(DockerCommandError, match="cannot set on an active plugin"):
            managed.enable()
            managed.set("STOWAGE_LOG_LEVEL=debug")
        managed.docker("plugin", "disable", managed.name)
        managed.set("STOWAGE_LOG_LEVEL=debug")
        managed.enable()
        volume = mp.create_volume(mp.unique("log"))
        mp.inspect_volume(volume)
        wait_until(debug_lines, 10, interval=0.2, what="DEBUG lines of the plugin in dockerd's log")
        assert any("request /VolumeDriver.Get" in line for line in managed.dockerd_log_lines())
        mp.docker("volume", "rm", volume)
    finally:
        managed.docker("plugin", "disable", "-f", managed.name, check=False)
        managed.set("STOWAGE_LOG_LEVEL=info")
        managed.enable()
    env = managed.inspect()["Settings"]["Env"]
    assert "STOWAGE_LOG_LEVEL=info" in env


def test_dockerd_restart_keeps_plugin_volumes_and_data(managed: Managed, mp: E2E) -> None:
    volume = mp.create_volume(mp.unique("rst"), mode="0700")
    write_then_read(mp, volume, "before-restart")
    mp.dockerd.restart()
    assert managed.enabled, "dockerd re-enables an enabled plugin at start"
    assert socket_accepts(managed.socket, timeout=1.0)
    assert mp.volumes() == {volume: PLUGIN}
    info = mp.inspect_volume(volume)
    assert info["Options"] == {"mode": "0700"}
    assert info["Mountpoint"].startswith(PROPAGATED_MOUNT + "/")
    out = mp.run("--rm", "-v", f"{volume}:/data", mp.image, "cat", "/data/f").stdout
    assert out == "before-restart\n"


@pytest.mark.s3
@pytest.mark.fuse
def test_upgrade_by_reinstall_keeps_volumes_options_and_data(
    managed: Managed, mp: E2E, s3_server: S3Server
) -> None:
    """The documented upgrade: disable, rm, create the new build, point it at the same state
    directory, enable. The new plugin has a new id and rootfs; Docker's volume records name the
    driver, and stowage's state (options, data, S3 settings) is in the state directory."""
    local = mp.create_volume(mp.unique("upg"), uid="1000", gid="1000", mode="0750")
    write_then_read(mp, local, "before-upgrade")
    bucket = s3_server.new_bucket()
    s3_opts = {
        "backend": "s3", "bucket": bucket, "prefix": "p", "endpoint": s3_server.endpoint,
        "profile": S3_PROFILE, "dir_markers": "false",
    }  # fmt: skip
    remote = mp.create_volume(mp.unique("ups3"), **s3_opts)
    write_then_read(mp, remote, "s3-before-upgrade")
    old_id = managed.plugin_id

    refused = managed.docker("plugin", "disable", managed.name, check=False)
    assert "in use" in refused.stderr, "volumes exist: a plain disable is refused"
    managed.docker("plugin", "disable", "-f", managed.name)
    managed.docker("plugin", "rm", "-f", managed.name)
    managed.cleanup_host()
    managed.create_again()  # a new plugin on the same state directory
    assert managed.plugin_id != old_id
    managed.enable()

    assert mp.volumes() == {local: PLUGIN, remote: PLUGIN}
    assert mp.inspect_volume(local)["Status"]["options"] == {
        "uid": "1000", "gid": "1000", "mode": "0750",
    }  # fmt: skip
    assert mp.inspect_volume(remote)["Status"]["options"]["bucket"] == bucket
    for volume in (local, remote):
        assert_under_propagated_mount(mp, volume)
    out = mp.run("--rm", "-v", f"{local}:/data", mp.image, "sh", "-c",
                 "cat /data/f; stat -c '%u %g %a' /data").stdout  # fmt: skip
    assert out.splitlines() == ["before-upgrade", "1000 1000 750"]
    out = mp.run("--rm", "-v", f"{remote}:/data", mp.image, "cat", "/data/f").stdout
    assert out == "s3-before-upgrade\n"


def test_compose_project_uses_the_managed_plugin_by_name(
    managed: Managed, mp: E2E, tmp_path: Path
) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not found: apt-get install docker-compose")
    project = f"stwm{os.getpid()}"
    # The full name with its tag: Docker records the driver as NAME:TAG, and Compose compares
    # the configured driver with the recorded one on every `up`.
    env = mp.dockerd.env({"STOWAGE_DRIVER": PLUGIN, "STOWAGE_EXAMPLE_IMAGE": mp.image})

    def compose(*args: str) -> str:
        cmd = [binary, "--ansi", "never", "-p", project, "-f", str(COMPOSE_EXAMPLE), *args]
        result = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
        return result.stdout

    def run_service(service: str) -> str:
        compose("up", "-d", "--force-recreate", "--no-deps", service)
        container = compose("ps", "-q", service).strip()
        assert mp.docker("wait", container).stdout.strip() == "0"
        return str(mp.docker("logs", container).stdout)

    volume = f"{project}_store"
    try:
        run_service("writer")
        assert mp.volumes() == {volume: PLUGIN}
        assert_under_propagated_mount(mp, volume)
        assert run_service("reader").splitlines() == ["compose-data", "1000 1000 750"]
        compose("down")
        assert volume in mp.volumes(), "`down` keeps the volume"
        compose("down", "-v")
        assert volume not in mp.volumes()
        assert not (managed.state_dir / "volumes" / volume).exists()
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            compose("down", "-v", "--remove-orphans")


def test_plugin_config_is_valid_json_with_the_documented_settings() -> None:
    """config.json: the fields operators rely on (no empty `args`: rclone's pitfall)."""
    config = json.loads((REPO / "config.json").read_text())
    assert config["interface"]["types"] == ["docker.volumedriver/1.0"]
    assert config["propagatedMount"] == PROPAGATED_MOUNT
    assert "--mount-root" in config["entrypoint"]
    assert config["entrypoint"][config["entrypoint"].index("--mount-root") + 1] == (
        PROPAGATED_MOUNT
    )
    assert "args" not in config
    mounts = {m["name"]: m for m in config["mounts"]}
    assert list(mounts) == ["state", "credentials"]
    assert all(m["settable"] == ["source"] for m in mounts.values())
    assert "ro" in mounts["credentials"]["options"]
    env = {e["name"]: e for e in config["env"]}
    assert set(env) >= {"STOWAGE_LOG_LEVEL", "STOWAGE_CREDENTIALS_FILE"}
    credentials_file = Path(env["STOWAGE_CREDENTIALS_FILE"]["value"])
    assert credentials_file.parent == Path(mounts["credentials"]["destination"])


@pytest.fixture
def registry(e2e_base: Path) -> Iterator[Registry]:
    if not Registry.available():
        pytest.skip("docker-registry is not installed (scripts/setup --test installs it)")
    server = Registry(e2e_base / "registry")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.s3
@pytest.mark.fuse
def test_install_and_upgrade_from_a_registry_keep_volumes_and_data(
    managed: Managed, mp: E2E, registry: Registry, s3_server: S3Server, e2e_base: Path
) -> None:
    """The registry path: push two versions, `docker plugin install` the first with both
    mounts set, use it, then `docker plugin upgrade` in place: same plugin id and settings,
    new version running, every volume, option and byte still there."""
    repo = f"{registry.address}/stowage-e2e"
    config_path = managed.plugin_dir / "config.json"
    original = config_path.read_text()
    # dockerd refuses to create a plugin whose rootfs blob it already holds ("content ...
    # already exists"), so each version gets a marker file that makes its rootfs its own.
    marker = managed.plugin_dir / "rootfs" / "etc" / "stowage-e2e-build"
    try:
        for tag in ("1", "2"):
            config = json.loads(original)
            config["description"] += f" (e2e build {tag})"
            config_path.write_text(json.dumps(config))
            marker.write_text(f"{tag}\n")
            plugin_ref = f"{repo}:{tag}"
            managed.docker("plugin", "create", plugin_ref, str(managed.plugin_dir), timeout=300)
            managed.docker("plugin", "push", plugin_ref, timeout=300)
            managed.docker("plugin", "rm", plugin_ref)
    finally:
        config_path.write_text(original)
        marker.unlink(missing_ok=True)

    alias = "stowage-registry:latest"
    state = e2e_base / "registry-state"
    state.mkdir(mode=0o700)
    reg = E2E(mp.dockerd, mp.stowage, alias, mp.images, mp.allowed)
    settings = (
        f"state.source={state}",
        f"credentials.source={managed.credentials_dir}",
        f"STOWAGE_S3_ENDPOINT={s3_server.endpoint}",
    )
    plugin_ids: list[str] = []
    try:
        managed.docker(
            "plugin", "install", "--grant-all-permissions", "--alias", alias, f"{repo}:1",
            *settings, timeout=300,
        )  # fmt: skip
        before = mp.dockerd.docker_json("plugin", "inspect", alias)[0]
        plugin_ids.append(before["Id"])
        assert before["Enabled"], "install enables the plugin"
        assert before["PluginReference"] == f"{repo}:1"
        local = reg.create_volume(reg.unique("reg"), mode="0750")
        write_then_read(reg, local, "from-v1")
        bucket = s3_server.new_bucket()
        remote = reg.create_volume(
            reg.unique("regs3"), backend="s3", bucket=bucket, profile=S3_PROFILE,
            dir_markers="false",
        )  # fmt: skip
        write_then_read(reg, remote, "s3-from-v1")
        assert (state / "volumes" / local / "data" / "f").read_text() == "from-v1\n"

        managed.docker("plugin", "disable", "-f", alias)
        # --skip-remote-check: the new version comes from another tag than the installed one
        # (otherwise the CLI asks "Plugin images do not match, are you sure?").
        upgraded = managed.docker(
            "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", alias,
            f"{repo}:2", timeout=300,
        )  # fmt: skip
        assert f"Upgraded plugin {alias} to {repo}:2" in upgraded.stdout, upgraded.stdout
        # dockerd resets a plugin's settings to the new config's defaults on upgrade, so the
        # documented procedure sets them again before enable.
        managed.docker("plugin", "set", alias, *settings)
        managed.docker("plugin", "enable", alias, timeout=60)

        after = mp.dockerd.docker_json("plugin", "inspect", alias)[0]
        assert after["Id"] == before["Id"], "upgrade keeps the plugin"
        assert after["PluginReference"] == f"{repo}:2"
        assert after["Config"]["Description"].endswith("(e2e build 2)")
        assert {m["Name"]: m["Source"] for m in after["Settings"]["Mounts"]} == {
            "state": str(state), "credentials": str(managed.credentials_dir),
        }  # fmt: skip
        assert f"STOWAGE_S3_ENDPOINT={s3_server.endpoint}" in after["Settings"]["Env"]
        assert reg.volumes() == {local: alias, remote: alias}
        assert reg.inspect_volume(local)["Status"]["options"] == {"mode": "0750"}
        for volume, text in ((local, "from-v1"), (remote, "s3-from-v1")):
            out = reg.run("--rm", "-v", f"{volume}:/data", reg.image, "cat", "/data/f").stdout
            assert out == f"{text}\n"
    finally:
        remove_everything(mp.dockerd, alias)
        managed.docker("plugin", "disable", "-f", alias, check=False)
        managed.docker("plugin", "rm", "-f", alias, check=False)
        for plugin_id in plugin_ids:
            unmount_under(mp.dockerd.data_root / "plugins" / plugin_id)
