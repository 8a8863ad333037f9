"""A container must not make the daemon (root) write on the host through its volume.

Attack 1 of the security issue: a staged volume refreshed from an allowed host path
(`stage_in_policy=always`). A container replaces a directory of the volume with a symlink to a
host directory; at the next Mount the refresh copies the source into the volume, and a copy that
follows the planted link writes the source's files into the host directory, as root. The copy
engine must treat a symlink beneath the destination as data: where the source has a directory
the link is replaced by a directory, where it has a file the link is replaced by the file, and
nothing is ever written, chmod-ed or touched through it.

Every step goes through the real dockerd and stowage as a legacy plugin, as an attacker with
`docker run` would; the host side is checked with a snapshot (names, inodes, modes, owners,
times, contents) of a sentinel directory outside every allowed path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from e2e.helpers import E2E

pytestmark = pytest.mark.docker

Snapshot = dict[str, tuple[object, ...]]

#: A fixed past mtime for host files, so that any utime through a link shows.
PAST_NS = 1_000_000_000 * 1_000_000_000


def snapshot(root: Path) -> Snapshot:
    """Everything an escape could change beneath `root`, `root` itself included, never
    following a symlink: per entry its type, inode, permissions, owner, mtime, ctime (any chmod,
    chown, utime or link count change), and content (file bytes, link target)."""
    entries: Snapshot = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        paths += [Path(dirpath, name) for name in sorted(dirnames + filenames)]
    for path in paths:
        st = path.lstat()
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        entries[str(path.relative_to(root))] = (
            stat.S_IFMT(st.st_mode),
            st.st_ino,
            oct(stat.S_IMODE(st.st_mode)),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_ctime_ns,
            content,
        )
    return entries


def changes(before: Snapshot, after: Snapshot) -> str:
    """What an escape did, for the assertion message: names that appeared, went or changed."""
    appeared = sorted(after.keys() - before.keys())
    gone = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return f"appeared {appeared}, gone {gone}, changed {changed}"


def make_source(e2e: E2E) -> Path:
    """A stage-in source under the allowed path: conf/{a.txt,b.txt,sub/c.txt}, with modes that
    differ from the sentinel's, so a chmod through a link would show."""
    src = e2e.allowed / e2e.unique("src")
    (src / "conf" / "sub").mkdir(parents=True)
    (src / "conf" / "a.txt").write_text("alpha\n")
    (src / "conf" / "b.txt").write_text("beta\n")
    (src / "conf" / "sub" / "c.txt").write_text("gamma\n")
    (src / "conf").chmod(0o777)
    (src / "conf" / "a.txt").chmod(0o666)
    return src


def staged_volume(e2e: E2E, src: Path) -> str:
    """A local volume refreshed from `src` whenever it goes from unmounted to mounted."""
    return e2e.create_volume(e2e.unique("esc"), stage_in=str(src), stage_in_policy="always")


def in_container(e2e: E2E, volume: str, script: str, check: bool = True) -> str:
    """Run `script` in a fresh container with `volume` at /d (one Mount, one refresh)."""
    result = e2e.run("--rm", "-v", f"{volume}:/d", e2e.image, "sh", "-c", script, check=check)
    return result.stdout + result.stderr


def volume_data(e2e: E2E, volume: str) -> Path:
    return e2e.stowage.root / "volumes" / volume / "data"


# What /d/conf/a.txt is, as the container sees it: `link` or `file`, then its content.
SHOW_A = "if [ -L /d/conf/a.txt ]; then echo link; elif [ -f /d/conf/a.txt ]; then echo file; fi"
SHOW_CONF = (
    "if [ -L /d/conf ]; then echo link; elif [ -d /d/conf ]; then echo dir; fi; "
    "cat /d/conf/a.txt /d/conf/b.txt /d/conf/sub/c.txt"
)


def test_symlink_planted_at_a_directory_is_replaced_not_followed(e2e: E2E, outside: Path) -> None:
    """`rm -rf /d/conf && ln -s <host dir> /d/conf`: the next refresh must not write the
    source's conf/* into the host directory, and the container gets conf back as a directory."""
    sentinel = outside / "hostdir"
    sentinel.mkdir(mode=0o700)
    os.utime(sentinel, ns=(PAST_NS, PAST_NS))
    src = make_source(e2e)
    volume = staged_volume(e2e, src)

    assert in_container(e2e, volume, "cat /d/conf/a.txt") == "alpha\n"  # staged correctly
    in_container(e2e, volume, f"rm -rf /d/conf && ln -s {sentinel} /d/conf")
    assert os.readlink(volume_data(e2e, volume) / "conf") == str(sentinel), "link not planted"

    before = snapshot(outside)
    seen = in_container(e2e, volume, SHOW_CONF, check=False)  # this Mount refreshes stage-in
    after = snapshot(outside)

    assert after == before, (
        f"the stage-in refresh wrote on the host through the planted link: "
        f"{changes(before, after)}; the container saw {seen!r}"
    )
    assert sorted(os.listdir(sentinel)) == []
    assert seen == "dir\nalpha\nbeta\ngamma\n"
    conf = volume_data(e2e, volume) / "conf"
    assert stat.S_ISDIR(conf.lstat().st_mode)
    assert (conf / "a.txt").read_text() == "alpha\n"


def test_symlink_planted_at_a_file_is_replaced_not_followed(e2e: E2E, outside: Path) -> None:
    """`ln -s <host file> /d/conf/a.txt`: the refresh must not overwrite, chmod or touch the host
    file (content and inode kept), and the container gets the source's a.txt back."""
    host_file = outside / "host-secret.txt"
    host_file.write_text("host-original\n")
    host_file.chmod(0o600)
    os.utime(host_file, ns=(PAST_NS, PAST_NS))
    src = make_source(e2e)
    volume = staged_volume(e2e, src)

    assert in_container(e2e, volume, "cat /d/conf/a.txt") == "alpha\n"
    in_container(e2e, volume, f"rm -f /d/conf/a.txt && ln -s {host_file} /d/conf/a.txt")
    planted = volume_data(e2e, volume) / "conf" / "a.txt"
    assert os.readlink(planted) == str(host_file), "link not planted"

    before = snapshot(outside)
    seen = in_container(e2e, volume, f"{SHOW_A}; cat /d/conf/a.txt", check=False)
    after = snapshot(outside)

    assert after == before, (
        f"the stage-in refresh changed a host file through the planted link: "
        f"{changes(before, after)}; the container saw {seen!r}"
    )
    assert host_file.read_text() == "host-original\n"
    assert seen == "file\nalpha\n"
    assert stat.S_ISREG(planted.lstat().st_mode)


def test_volume_rm_does_not_follow_a_planted_symlink(e2e: E2E, outside: Path) -> None:
    """Removing a managed volume deletes its data: a link a container left in it (to a host
    directory with content) is removed as a link, the host directory keeps everything."""
    sentinel = outside / "hostdir"
    (sentinel / "deep").mkdir(parents=True)
    (sentinel / "keep.txt").write_text("host data\n")
    (sentinel / "deep" / "keep2.txt").write_text("more host data\n")
    volume = e2e.create_volume(e2e.unique("rm"))
    in_container(e2e, volume, f"ln -s {sentinel} /d/escape && ln -s {sentinel}/keep.txt /d/f")
    data = volume_data(e2e, volume)
    assert os.readlink(data / "escape") == str(sentinel), "link not planted"

    before = snapshot(outside)
    e2e.docker("volume", "rm", volume)
    after = snapshot(outside)

    assert after == before, f"docker volume rm went through a link: {changes(before, after)}"
    assert not data.exists()
