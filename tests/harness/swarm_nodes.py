"""Several Docker hosts on one machine, for a real Swarm: each node is a network namespace
joined to a test bridge by a veth pair, plus a mount and UTS namespace in which its containerd,
dockerd and stowage daemon run.

Why a mount namespace per node: dockerd finds legacy plugins by name in the fixed directory
/run/docker/plugins, so each node's dockerd must see its own stowage socket there and no other.
Inside the node, a private tmpfs covers /run (so the host's /run stays untouched, containerd's
shim sockets included) and the node's own plugin directory is bind-mounted on
/run/docker/plugins. That directory lives in the node's base directory on the host, so the test
can still reach the stowage socket. All of a node's mounts (overlay layers, FUSE, volume binds)
live in its namespace and vanish with its last process.

Addresses: 10.251.<subnet>.1/24 on the host's bridge (where the test's S3 server listens), node
i at 10.251.<subnet>.<10+i>. Nothing is routed or masqueraded: the nodes reach each other and
the bridge address, nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.daemon import StowageDaemon
from harness.dockerd import Dockerd, kill_and_wait, wait_until
from harness.s3servers import S3Server, aws_env, die_with_parent

log = logging.getLogger(__name__)

SUBNET_BASE = "10.251"
#: How long a node's namespace holder lives at most: the tier takes about two minutes.
HOLDER_LIFETIME_S = 900


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip <args>`; bounded, output kept for the error message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def _free_subnet() -> int:
    """A third octet no address of this machine uses within 10.251.0.0/16."""
    used = ip("-4", "-o", "addr", "show").stdout
    candidates = [n for n in range(1, 255) if f" {SUBNET_BASE}.{n}." not in used]
    if not candidates:
        raise RuntimeError(f"every {SUBNET_BASE}.N.0/24 is in use on this machine")
    return random.choice(candidates)


@dataclass
class TestNetwork:
    """A bridge on the host and one network namespace per node, each joined by a veth pair."""

    __test__ = False  # not a pytest test class, despite the name

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = field(default_factory=_free_subnet)
    namespaces: list[str] = field(default_factory=list)
    bridge_up: bool = False

    @property
    def bridge(self) -> str:
        return f"stwb{self.tag}"

    @property
    def host_address(self) -> str:
        return f"{SUBNET_BASE}.{self.subnet}.1"

    def node_address(self, index: int) -> str:
        return f"{SUBNET_BASE}.{self.subnet}.{10 + index}"

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.bridge_up = True
        ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_node(self, index: int) -> str:
        """A namespace with lo up and a veth to the bridge at node_address(index)."""
        namespace = f"stw-{self.tag}-{index}"
        outside, inside = self._outside(namespace), f"stw{self.tag}n{index}"
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", namespace)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("-n", namespace, "addr", "add", f"{self.node_address(index)}/24", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _outside(self, namespace: str) -> str:
        """The host end of a node's veth pair."""
        return f"stw{self.tag}h{namespace.rsplit('-', 1)[1]}"

    def destroy(self) -> list[str]:
        """Delete namespaces (their veth ends go with them) and the bridge; returns problems."""
        problems = []
        for namespace in self.namespaces:
            # Deleting the host end deletes the pair now; a namespace's own devices go only
            # when the kernel's cleanup worker gets to it, after its last process.
            ip("link", "delete", self._outside(namespace), check=False)
        for namespace in reversed(self.namespaces):
            result = ip("netns", "delete", namespace, check=False)
            if result.returncode != 0:
                problems.append(f"ip netns delete {namespace}: {result.stderr.strip()}")
        self.namespaces.clear()
        if self.bridge_up:
            result = ip("link", "delete", self.bridge, check=False)
            if result.returncode != 0:
                problems.append(f"ip link delete {self.bridge}: {result.stderr.strip()}")
            self.bridge_up = False
        return problems

    def leftovers(self) -> list[str]:
        """Interfaces or namespaces carrying this network's tag (for the no-leftovers check)."""
        links = [line for line in ip("-o", "link").stdout.splitlines() if self.tag in line]
        spaces = [line for line in ip("netns", "list").stdout.splitlines() if self.tag in line]
        return links + spaces


@dataclass
class BoundS3Server(S3Server):
    """An S3Server listening on `host` (e.g. the bridge address) instead of 127.0.0.1."""

    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        cmd = super()._command()
        flag = "--addr" if self.kind == "rclone" else "-H"
        at = cmd.index(flag) + 1
        cmd[at] = f"{self.host}:{self.port}" if self.kind == "rclone" else self.host
        return cmd


def _daemon_env() -> dict[str, str]:
    """The test servers' credentials; no proxy, the S3 server is on the test bridge."""
    env = aws_env()
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy"):
        env.pop(proxy, None)
    return env


class NodeStowage(StowageDaemon):
    """`stowage serve` inside a node's namespaces (nsenter execs, so the pid is stowage's)."""

    def __init__(self, prefix: tuple[str, ...], base: Path, extra_args: tuple[str, ...]) -> None:
        super().__init__(
            socket_path=base / "plugins" / "stowage.sock",
            root=base / "root",
            log_path=base / "stowage.log",
            extra_args=extra_args,
            env=_daemon_env(),
        )
        self.prefix = prefix

    def command(self) -> list[str]:
        return [*self.prefix, *super().command()]


class SwarmNode:
    """One Docker host: namespaces (held by a sleeping process), stowage, containerd, dockerd."""

    def __init__(self, index: int, network: TestNetwork, base: Path) -> None:
        self.index = index
        self.network = network
        self.base = base
        self.hostname = f"stw-node{index}"
        self.address = network.node_address(index)
        self.plugins_dir = base / "plugins"
        self.holder: subprocess.Popen[bytes] | None = None
        self.stowage: NodeStowage | None = None
        self.dockerd: Dockerd | None = None

    @property
    def nsenter(self) -> tuple[str, ...]:
        assert self.holder is not None
        pid = self.holder.pid
        return ("nsenter", f"--target={pid}", "--mount", "--net", "--uts", "--")

    def start_namespaces(self, timeout: float = 20.0) -> None:
        namespace = self.network.add_node(self.index)
        self.plugins_dir.mkdir(parents=True, exist_ok=True)
        ready = self.base / "namespaces-ready"
        script = (
            f"hostname {self.hostname}"
            " && mount -t tmpfs -o mode=0755,size=64m stowage-swarm-run /run"
            " && mkdir -p /run/docker/plugins"
            f" && mount --bind {self.plugins_dir} /run/docker/plugins"
            f" && touch {ready}"
            f" && exec sleep {HOLDER_LIFETIME_S}"
        )
        with open(self.base / "holder.log", "ab") as logf:
            # Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts dockerd needs. A
            # UTS namespace gives each node its own hostname in `docker node ls`.
            command = [
                "nsenter", f"--net=/run/netns/{namespace}", "--",
                "unshare", "--mount", "--uts", "--propagation", "slave", "--",
                "sh", "-c", script,
            ]  # fmt: skip
            self.holder = subprocess.Popen(
                command,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        holder = self.holder

        def up() -> bool:
            if holder.poll() is not None:
                log_text = (self.base / "holder.log").read_text(errors="replace")
                raise RuntimeError(f"node {self.index} namespace holder exited: {log_text}")
            return ready.exists()

        wait_until(up, timeout, 0.05, f"node {self.index} namespaces")

    def start_stowage(self, registry_url: str, s3: S3Server, lease_ttl_s: float) -> NodeStowage:
        args = (
            "--registry", registry_url,
            "--registry-endpoint", s3.endpoint,
            "--registry-lease-ttl", str(lease_ttl_s),
            "--s3-endpoint", s3.endpoint,
        )  # fmt: skip
        self.stowage = NodeStowage(self.nsenter, self.base, args)
        self.stowage.start()
        return self.stowage

    def start_dockerd(self) -> Dockerd:
        dockerd = Dockerd(base=self.base / "d", log_level="info")
        dockerd.launch_prefix = self.nsenter
        self.dockerd = dockerd
        dockerd.start()
        # dockerd loads a legacy plugin on first use, and only loaded volume drivers are in the
        # node description Swarm schedules by ("missing plugin on 1 node"): use it once.
        dockerd.docker("volume", "ls", "--filter", "driver=stowage")
        wait_until(self._stowage_listed, 30.0, 0.5, f"stowage in node {self.index}'s docker info")
        return dockerd

    def _stowage_listed(self) -> bool:
        assert self.dockerd is not None
        out = self.dockerd.docker("info", "--format", "{{json .Plugins.Volume}}").stdout
        return "stowage" in out

    def stop(self) -> list[str]:
        """Stop dockerd (containers first), stowage, then the namespace holder."""
        problems = []
        if self.dockerd is not None:
            with contextlib.suppress(Exception):
                self.dockerd.docker("swarm", "leave", "--force", check=False, timeout=30)
            try:
                self.dockerd.stop()
            except Exception as exc:
                problems.append(f"node {self.index} dockerd: {exc}")
        if self.stowage is not None:
            try:
                self.stowage.kill()
            except Exception as exc:
                problems.append(f"node {self.index} stowage: {exc}")
        if self.holder is not None and self.holder.poll() is None:
            if kill_and_wait([self.holder.pid]):
                problems.append(f"node {self.index} namespace holder survived SIGKILL")
            self.holder.wait(10)
        return problems

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        if self.stowage is not None:
            # Without the SDK's debug chatter, which would push everything else out.
            lines = self.stowage.log_text().splitlines()
            ours = "\n".join(
                line for line in lines if "[boto" not in line and "[urllib3" not in line
            )
            parts.append(f"--- node {self.index} stowage log\n{ours[-chars:]}")
        if self.dockerd is not None:
            parts.append(f"--- node {self.index} dockerd log\n{self.dockerd.log_text()[-chars:]}")
        return "\n".join(parts)
