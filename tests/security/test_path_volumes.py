"""Security attack 3: a `path=` directory (or a directory above it, beneath the allowed root)
replaced by a symlink after Create must never make stowage hand Docker, or bind itself,
anything outside the allowed paths. Mount opens the directory beneath its allowed root with
nothing followed and hands Docker a bind of that descriptor at stowage's own mountpoint.

Unit level: the real LocalBackend on a temporary root, driven through VolumeDriver for the
mount-ID bookkeeping. Binds need root; every mount made under the test's directory is
detached by the fixture, also when a test fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugin.backends import mounts
from plugin.backends.local import LocalBackend
from plugin.driver import VolumeDriver
from plugin.driver.state import StateStore
from plugin.errors import MountError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

ID1 = "1" * 64
ID2 = "2" * 64


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    return sorted(m for m in mounts.mountpoints() if m.startswith(prefix))


def inode(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass
class Env:
    tmp: Path
    root: Path
    allowed: Path
    outside: Path
    drivers: list[VolumeDriver]

    def driver(self) -> VolumeDriver:
        """A driver on the shared root; a second call is a daemon restart."""
        backend = LocalBackend(self.root, (self.allowed,))
        made = VolumeDriver(
            StateStore(self.root / "state.db", boot_id="boot-1"), {"local": backend}
        )
        self.drivers.append(made)
        return made

    @property
    def mountpoint_dir(self) -> Path:
        return self.root / "mounts"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    tmp = Path(os.path.realpath(tmp_path))
    root = tmp / "root"
    root.mkdir()
    allowed = tmp / "allowed"
    allowed.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside\n")
    made = Env(tmp, root, allowed, outside, [])
    try:
        yield made
    finally:
        for driver in made.drivers:
            driver.close()
        for _ in range(3):  # stacked mounts come off one layer at a time
            for mountpoint in reversed(mounts_under(tmp)):
                mounts.lazy_unmount(Path(mountpoint))
        assert mounts_under(tmp) == []
        assert (outside / "secret").read_text() == "outside\n"


def served_dir(env: Env, rel: str = "share") -> Path:
    host = env.allowed / rel
    host.mkdir(parents=True)
    (host / "secret").write_text("inside\n")
    return host


def swap_for_link(path: Path, target: Path) -> Path:
    """Move the real directory aside and put a symlink to *target* in its place."""
    aside = path.with_name(path.name + ".moved")
    path.rename(aside)
    path.symlink_to(target)
    return aside


def test_path_volume_is_a_bind_of_the_directory(env: Env) -> None:
    host = served_dir(env)
    driver = env.driver()
    driver.create("p", {"path": str(host)})
    mountpoint = Path(driver.mount("p", ID1))
    assert mountpoint == env.mountpoint_dir / "p", "never the host path string"
    assert driver.path("p") == driver.get("p").mountpoint == str(mountpoint)
    assert dict(driver.list())["p"] == str(mountpoint)
    assert mounts.is_mountpoint(mountpoint)
    assert inode(mountpoint) == inode(host)
    assert (mountpoint / "secret").read_text() == "inside\n"
    (mountpoint / "written").write_text("through the bind\n")
    assert (host / "written").read_text() == "through the bind\n"
    assert driver.mount("p", ID2) == str(mountpoint)
    driver.unmount("p", ID1)
    assert mounts.is_mountpoint(mountpoint), "still used by ID2"
    driver.unmount("p", ID2)
    assert not mounts.is_mountpoint(mountpoint)
    assert not mountpoint.exists()
    driver.remove("p")
    assert (host / "written").exists(), "path= data is the user's"


@pytest.mark.parametrize("readonly", [False, True])
def test_served_dir_swapped_for_a_symlink_is_refused(env: Env, readonly: bool) -> None:
    host = served_dir(env)
    driver = env.driver()
    driver.create("p", {"path": str(host), "readonly": str(readonly).lower()})
    swap_for_link(host, env.outside)
    with pytest.raises(MountError) as raised:
        driver.mount("p", ID1)
    message = str(raised.value)
    assert str(host) in message
    assert "is now a symlink" in message
    assert "outside the allowed paths" in message
    assert mounts_under(env.tmp) == [], "nothing may be bound"
    assert driver.get("p").status["mounts"] == 0


@pytest.mark.parametrize("readonly", [False, True])
def test_component_between_allowed_root_and_dir_swapped_is_refused(
    env: Env, readonly: bool
) -> None:
    host = served_dir(env, "team/projects/share")
    fake = env.outside / "projects" / "share"
    fake.mkdir(parents=True)
    (fake / "secret").write_text("outside\n")
    driver = env.driver()
    driver.create("p", {"path": str(host), "readonly": str(readonly).lower()})
    swap_for_link(env.allowed / "team", env.outside)
    assert (host / "secret").read_text() == "outside\n"  # the string now leads outside
    with pytest.raises(MountError, match=r"is now a symlink, or a directory between") as raised:
        driver.mount("p", ID1)
    assert str(host) in str(raised.value)
    assert mounts_under(env.tmp) == []


def test_swap_after_a_mount_refuses_the_next_and_keeps_the_bind_inside(env: Env) -> None:
    host = served_dir(env)
    driver = env.driver()
    driver.create("p", {"path": str(host)})
    mountpoint = Path(driver.mount("p", ID1))
    real = inode(host)
    swap_for_link(host, env.outside)
    with pytest.raises(MountError, match="is now a symlink"):
        driver.mount("p", ID2)
    assert inode(mountpoint) == real, "the bind made earlier still shows the real directory"
    assert (mountpoint / "secret").read_text() == "inside\n"
    driver.unmount("p", ID1)
    assert mounts_under(env.tmp) == []


def test_restart_recovery_rebinds_a_lost_bind(env: Env) -> None:
    host = served_dir(env)
    first = env.driver()
    first.create("p", {"path": str(host)})
    mountpoint = Path(first.mount("p", ID1))
    mounts.lazy_unmount(mountpoint)  # lost, e.g. by a mount namespace change
    first.close()
    env.drivers.remove(first)
    second = env.driver()
    assert second.path("p") == str(mountpoint)
    second.recover()
    assert mounts.is_mountpoint(mountpoint)
    assert inode(mountpoint) == inode(host)
    second.unmount("p", ID1)
    assert mounts_under(env.tmp) == []


def test_restart_recovery_refuses_a_dir_swapped_meanwhile(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    host = served_dir(env)
    first = env.driver()
    first.create("p", {"path": str(host)})
    mountpoint = Path(first.mount("p", ID1))
    mounts.lazy_unmount(mountpoint)
    first.close()
    env.drivers.remove(first)
    swap_for_link(host, env.outside)
    second = env.driver()
    with caplog.at_level(logging.WARNING):
        second.recover()
    assert "is now a symlink" in caplog.text
    assert mounts_under(env.tmp) == []


def test_bind_from_an_earlier_directory_is_replaced(env: Env) -> None:
    """A directory moved away and recreated under the same name: the next Mount binds the new
    one (an existing bind is checked against the opened directory, not trusted because it is
    there)."""
    host = served_dir(env)
    driver = env.driver()
    driver.create("p", {"path": str(host), "readonly": "true"})
    mountpoint = Path(driver.mount("p", ID1))
    host.rename(env.allowed / "old")
    served_dir(env)
    driver.mount("p", ID2)
    assert inode(mountpoint) == inode(host)
    driver.unmount("p", ID1)
    driver.unmount("p", ID2)
    assert mounts_under(env.tmp) == []


def test_trash_never_follows_a_link(env: Env) -> None:
    """Housekeeping empties the trash without following links: a leftover that is a symlink is
    unlinked, and links inside a leftover tree are deleted as links."""
    backend = LocalBackend(env.root, (env.allowed,))
    trash = env.root / "trash"
    trash.mkdir()
    (trash / "linked.0").symlink_to(env.outside)
    tree = trash / "tree.1" / "data"
    tree.mkdir(parents=True)
    (tree / "escape").symlink_to(env.outside)
    (tree / "file").write_text("x")
    backend.housekeeping()
    assert list(trash.iterdir()) == []
    assert (env.outside / "secret").read_text() == "outside\n"


@pytest.mark.slow
def test_symlink_swap_race_never_binds_outside(env: Env) -> None:
    """A thread flips the served directory between the real one and a symlink to an outside
    directory while Mount/Unmount run in a loop: whatever Mount returns shows the real
    directory, never the outside one (bounded: <= 300 swaps, ~5 s)."""
    host = served_dir(env)
    real = inode(host)
    outside = inode(env.outside)
    aside = env.allowed / "share.aside"
    driver = env.driver()
    driver.create("p", {"path": str(host)})
    stop = threading.Event()
    swaps = 0

    def flip() -> None:
        nonlocal swaps
        while not stop.is_set() and swaps < 300:
            os.rename(host, aside)
            os.symlink(env.outside, host)
            time.sleep(0.002)
            os.unlink(host)
            os.rename(aside, host)
            swaps += 1
            time.sleep(0.002)

    flipper = threading.Thread(target=flip, name="flipper")
    served: list[tuple[int, int]] = []
    refused = 0
    deadline = time.monotonic() + 5.0
    flipper.start()
    try:
        while flipper.is_alive() and time.monotonic() < deadline:
            try:
                mountpoint = driver.mount("p", ID1)
            except MountError:
                refused += 1
                continue
            try:
                served.append(inode(mountpoint))
            except FileNotFoundError:
                served.append((-1, -1))  # a Mountpoint that names nothing at all
            finally:
                driver.unmount("p", ID1)
    finally:
        stop.set()
        flipper.join()
        if aside.is_dir():  # the flipper stopped mid-swap: put the real directory back
            host.unlink(missing_ok=True)
            aside.rename(host)
    assert served, f"no Mount succeeded in {swaps} swaps ({refused} refused)"
    assert outside not in served, "a Mount handed out the outside directory"
    assert set(served) == {real}, f"{len(served)} mounts, {served.count(real)} of the real dir"
    assert mounts_under(env.tmp) == []
