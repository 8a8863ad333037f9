"""Security attack 2: a hostile .tar.gz handed to `stowage volume restore`, which runs as root.

The property is the tier's: nothing outside the volume changes. Each test restores into
`dest` beneath a temporary directory whose every other path (a sentinel `host/` directory
with a secret file, and the parent itself, where '..' escapes land) is snapshotted with inode
numbers, link counts and contents before and after. Archives are built with tarfile's writer,
which writes whatever member it is given.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin.cli import main
from plugin.driver import archive as archive_mod
from plugin.driver import backup as backup_mod
from plugin.driver.archive import ArchiveError, extract_archive
from plugin.driver.backup import BackupError
from plugin.staging.engine import CopyOptions, S3Options
from plugin.staging.errors import StagingError

REPO = Path(__file__).resolve().parents[2]
REFUSED = "refusing the archive; nothing was extracted"

Member = tuple[tarfile.TarInfo, bytes | None]
MemberSpec = tuple[str, bytes, str, int]  # name, type, link target, mode


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind in tarfile.REGULAR_TYPES:
        info.size = len(data)
        return info, data
    return info, None


def write_tar(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def snapshot(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every path beneath *root* but *skip*: (inode, mode, links, content or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(top, d) != skip]
        for name in dirs + files:
            path = Path(top, name)
            s = path.lstat()
            body: object = None
            if stat.S_ISLNK(s.st_mode):
                body = os.readlink(path)
            elif stat.S_ISREG(s.st_mode):
                body = path.read_bytes()
            out[str(path)] = (s.st_ino, s.st_mode, s.st_nlink, s.st_size, body)
    return out


def listing(root: Path) -> dict[str, os.stat_result]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            out[os.path.relpath(Path(top, name), root)] = Path(top, name).lstat()
    return out


@dataclass
class Site:
    """tmp/ holds dest/ (the volume data), host/secret (the sentinel) and the archives."""

    base: Path
    dest: Path
    host: Path
    secret: Path

    def snap(self) -> dict[str, tuple[object, ...]]:
        return snapshot(self.base, self.dest)

    def restore(self, archive: Path) -> archive_mod.ArchiveResult:
        result = backup_mod.restore(str(archive), self.dest, CopyOptions(), S3Options())
        assert isinstance(result, archive_mod.ArchiveResult)
        return result

    def refused(self, members: list[Member], match: str = REFUSED) -> None:
        """The archive is refused whole: nothing in dest, nothing outside changed."""
        tar = write_tar(self.base / "x.tar.gz", members)
        before = self.snap()
        try:
            self.restore(tar)
        except BackupError as exc:
            error = str(exc)
        else:
            error = "(restored)"
        assert self.snap() == before, "something outside the volume changed"
        assert listing(self.dest) == {}, "the archive was (partly) extracted"
        assert match in error
        assert not list(self.base.rglob(".stowage.*"))


def make_site(base: Path) -> Site:
    dest, host = base / "dest", base / "host"
    dest.mkdir()
    host.mkdir()
    (host / "secret").write_bytes(b"host secret\n")
    (host / "secret").chmod(0o600)
    return Site(base, dest, host, host / "secret")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


# -- hostile names and links: refused up front ------------------------------------------------


def test_hardlink_to_a_host_file_is_refused(site: Site) -> None:
    site.refused(
        [
            member("ok.txt", data=b"fine"),
            member("h", tarfile.LNKTYPE, linkname=str(site.secret)),
            member("h", data=b"overwritten through the hardlink"),
        ]
    )


def test_hardlink_to_a_file_not_in_the_archive_is_refused(site: Site) -> None:
    (site.dest / "there").write_bytes(b"already in the volume")
    tar = write_tar(site.base / "x.tar.gz", [member("h", tarfile.LNKTYPE, linkname="there")])
    with pytest.raises(BackupError, match="not a file earlier in the archive"):
        site.restore(tar)
    assert sorted(listing(site.dest)) == ["there"]


@pytest.mark.parametrize("target", ["ABS", "../host", "."])
def test_member_through_a_symlink_member_is_refused(site: Site, target: str) -> None:
    target = str(site.host) if target == "ABS" else target
    site.refused(
        [
            member("ok.txt", data=b"fine"),
            member("s", tarfile.SYMTYPE, linkname=target),
            member("s/secret", data=b"written through the link"),
        ]
    )


@pytest.mark.parametrize(
    "target", ["../host/secret", "a/../../host", "sub/../..", "x/y/../../../host"]
)
def test_symlink_leaving_the_volume_is_refused(site: Site, target: str) -> None:
    site.refused([member("ok.txt", data=b"fine"), member("l", tarfile.SYMTYPE, linkname=target)])


def test_absolute_symlink_is_skipped_and_named(site: Site) -> None:
    """A container's `/data/cur -> /data/v2` means a host path on the host: not recreated,
    but not a reason to refuse the rest of a backup either."""
    tar = write_tar(
        site.base / "abs.tar.gz",
        [
            member("ok.txt", data=b"fine"),
            member("l", tarfile.SYMTYPE, linkname=str(site.secret)),
            member("l2", tarfile.SYMTYPE, linkname="/data/v2"),
        ],
    )
    before = site.snap()
    result = site.restore(tar)
    assert site.snap() == before
    assert (site.dest / "ok.txt").read_bytes() == b"fine"
    assert not os.path.lexists(site.dest / "l") and not os.path.lexists(site.dest / "l2")
    assert any("absolute symlink" in s and "'/data/v2'" in s for s in result.skipped)


def test_symlink_chain_of_inside_links_that_leads_out_is_refused(site: Site) -> None:
    """Each link is inside on its own; 'up/..' resolves through 'up' -> '.' + '..'."""
    site.refused(
        [
            member("d", tarfile.DIRTYPE),
            member("d/up", tarfile.SYMTYPE, linkname=".."),
            member("out", tarfile.SYMTYPE, linkname="d/up/.."),
        ]
    )


def test_cve_2025_4517_realpath_overflow_chain(site: Site) -> None:
    """CPython's test_realpath_limit_attack: a chain of links through directories whose
    expanded path exceeds PATH_MAX, so realpath() stops expanding and the filter is fooled;
    'escape' then points at dest/.., and a hardlink and a file are written through it."""
    steps = "abcdefghijklmnop"
    max_path = os.pathconf(site.base, "PC_PATH_MAX")
    component = "d" * ((max_path - len(str(site.dest)) - 1) // (len(steps) + 1))
    flag = site.base / "flag"
    flag.write_bytes(b"flag\n")
    members, path = [], ""
    for step in steps:
        members.append(member(os.path.join(path, component), tarfile.DIRTYPE, mode=0o777))
        members.append(member(os.path.join(path, step), tarfile.SYMTYPE, linkname=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members += [
        member(linkpath, tarfile.SYMTYPE, linkname=os.path.join(*[".."] * len(steps))),
        member("escape", tarfile.SYMTYPE, linkname=os.path.join(linkpath, "..")),
        member("flaglink", tarfile.LNKTYPE, linkname="escape/flag"),
        member("flaglink", data=b"overwrite"),
        member("escape/newfile", data=b"new"),
    ]
    site.refused(members)
    assert flag.read_bytes() == b"flag\n"


@pytest.mark.parametrize(
    "name", ["ABS", "../escaped", "a/../../escaped", "./../escaped", "ok/../../host/secret"]
)
def test_absolute_and_dotdot_names_are_refused(site: Site, name: str) -> None:
    name = str(site.host / "new") if name == "ABS" else name
    site.refused([member("ok.txt", data=b"fine"), member(name, data=b"escaped")])


def test_too_long_a_name_is_refused_before_anything_is_written(site: Site) -> None:
    site.refused([member("ok.txt", data=b"fine"), member("n" * 256, data=b"x")], "too long")


@pytest.mark.parametrize("damage", ["truncated", "not an archive"])
def test_damaged_archive_is_refused_before_anything_is_written(site: Site, damage: str) -> None:
    good = write_tar(site.base / "good.tar.gz", [member("f", data=os.urandom(200_000))])
    data = good.read_bytes()
    bad = site.base / "x.tar.gz"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello" * 100)
    with pytest.raises(BackupError, match="damaged or not a tar archive; nothing was extracted"):
        site.restore(bad)
    assert listing(site.dest) == {}


# -- members extracted with their dangerous parts removed -------------------------------------


@pytest.mark.parametrize("through_cli", [False, True])
def test_devices_and_fifos_are_skipped_and_named(
    site: Site,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    through_cli: bool,
) -> None:
    tar = write_tar(
        site.base / "x.tar.gz",
        [
            member("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
            member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
            member("fifo", tarfile.FIFOTYPE),
            member("file", data=b"kept"),
        ],
    )
    before = site.snap()
    if through_cli:
        monkeypatch.setattr(backup_mod, "volume_data_dir", lambda *a, **k: site.dest)
        code = main(["volume", "restore", str(tar), "vol", "--root", str(site.base)])
        err = capsys.readouterr().err
        assert sorted(listing(site.dest)) == ["file"]
        assert code == 0, err
        for text in ("null: character device 1,3", "sda: block device 8,0", "fifo: fifo"):
            assert f"warning: {text}; not extracted" in err
        assert "restored 1 files" in err
    else:
        result = site.restore(tar)
        assert sorted(listing(site.dest)) == ["file"]
        assert result.files == 1
        assert result.skipped == [
            "null: character device 1,3; not extracted",
            "sda: block device 8,0; not extracted",
            "fifo: fifo; not extracted",
        ]
    assert site.snap() == before


def test_setuid_setgid_sticky_are_stripped(site: Site) -> None:
    tar = write_tar(
        site.base / "x.tar.gz",
        [
            member("d", tarfile.DIRTYPE, mode=0o3777),
            member("d/suid", data=b"#!/bin/sh\n", mode=0o4777),
            member("sgid", data=b"x", mode=0o2750),
        ],
    )
    site.restore(tar)
    modes = {rel: stat.S_IMODE(s.st_mode) for rel, s in listing(site.dest).items()}
    assert modes == {"d": 0o777, "d/suid": 0o777, "sgid": 0o750}


def test_owners_come_from_the_volume_unless_asked(site: Site) -> None:
    os.chown(site.dest, 1234, 2345)
    members = [member("d", tarfile.DIRTYPE, uid=0, gid=0), member("d/f", uid=0, gid=0)]
    members += [member("l", tarfile.SYMTYPE, linkname="d/f", uid=7, gid=8)]
    tar = write_tar(site.base / "x.tar.gz", members)
    site.restore(tar)
    assert {(s.st_uid, s.st_gid) for s in listing(site.dest).values()} == {(1234, 2345)}
    extract_archive(tar, site.dest, preserve_owner=True)
    owners = {rel: (s.st_uid, s.st_gid) for rel, s in listing(site.dest).items()}
    assert owners == {"d": (0, 0), "d/f": (0, 0), "l": (7, 8)}


def test_links_already_in_the_volume_are_replaced_not_followed(site: Site) -> None:
    """A container left links (and a hardlink to a host file, as a careless tool could have)
    where the archive has a directory or files: they are replaced, nothing is written
    through them."""
    os.symlink(site.host, site.dest / "etc")
    os.symlink("../host", site.dest / "rel")
    os.symlink(site.secret, site.dest / "f")
    os.link(site.secret, site.dest / "hard")
    tar = write_tar(
        site.base / "x.tar.gz",
        [
            member("hard", data=b"in the volume 4"),
            member("f", data=b"in the volume 3"),
            member("etc/secret", data=b"in the volume 1"),
            member("rel", tarfile.DIRTYPE),
            member("rel/secret", data=b"in the volume 2"),
        ],
    )
    os.unlink(site.dest / "hard")  # snapshot the host file with its usual link count
    before = site.snap()
    os.link(site.secret, site.dest / "hard")
    try:
        site.restore(tar)
    finally:
        assert site.secret.read_bytes() == b"host secret\n"
    assert site.snap() == before
    found = listing(site.dest)
    assert sorted(found) == ["etc", "etc/secret", "f", "hard", "rel", "rel/secret"]
    assert not any(stat.S_ISLNK(s.st_mode) for s in found.values())
    assert (site.dest / "hard").stat().st_nlink == 1
    assert (site.dest / "hard").read_bytes() == b"in the volume 4"
    assert site.secret.read_bytes() == b"host secret\n"


def test_repeated_hardlink_member_leaves_no_temporary_name(site: Site) -> None:
    """rename(2) of a name onto another link to the same inode does nothing (found by the
    property test): the temporary name must still go."""
    link = member("h", tarfile.LNKTYPE, linkname="f")
    site.restore(write_tar(site.base / "x.tar.gz", [member("f", data=b"x"), link, link]))
    assert sorted(listing(site.dest)) == ["f", "h"]
    assert (site.dest / "f").stat().st_nlink == 2


# -- legitimate archives ----------------------------------------------------------------------


def fill(data: Path) -> None:
    (data / "dir with space").mkdir()
    (data / "dir with space" / "ü.txt").write_bytes(b"unicode\n")
    (data / "script.sh").write_bytes(b"#!/bin/sh\n")
    (data / "script.sh").chmod(0o750)
    (data / "private").mkdir(mode=0o700)
    (data / "private" / "key").write_bytes(os.urandom(70_000))
    (data / "private" / "key").chmod(0o600)
    os.link(data / "private" / "key", data / "key-again")
    (data / "empty").mkdir()
    os.symlink("script.sh", data / "link")
    os.symlink("../script.sh", data / "private" / "up")
    for n, path in enumerate(sorted(data.rglob("*"), reverse=True)):
        os.utime(
            path,
            ns=(1_600_000_000_000_000_000 + n, 1_600_000_000_123_456_789 + n * 7),
            follow_symlinks=False,
        )


def shape(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for rel, s in listing(root).items():
        path = root / rel
        body = (
            os.readlink(path)
            if path.is_symlink()
            else path.read_bytes()
            if path.is_file()
            else None
        )
        out[rel] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_mtime_ns // 10**9, body)
    return out


def test_round_trip_keeps_content_modes_links_hardlinks_mtimes(site: Site) -> None:
    src = site.base / "src"
    src.mkdir()
    fill(src)
    os.mkfifo(src / "fifo")
    tar = site.base / "b.tar.gz"
    result = backup_mod.backup(src, str(tar), CopyOptions(), S3Options())
    assert isinstance(result, archive_mod.ArchiveResult)
    assert result.skipped == ["./fifo: fifo; not archived"]
    assert (result.files, result.hardlinks, result.symlinks, result.dirs) == (3, 1, 2, 3)
    os.unlink(src / "fifo")
    site.restore(tar)
    assert shape(site.dest) == shape(src)
    assert (site.dest / "key-again").stat().st_ino == (site.dest / "private" / "key").stat().st_ino
    # sub-second mtimes survive our own archives (the pax header keeps them)
    assert abs((site.dest / "link").lstat().st_mtime_ns - (src / "link").lstat().st_mtime_ns) < 1000
    with tarfile.open(tar) as t:
        assert all(n == "." or n.startswith("./") for n in t.getnames())


def test_archives_are_interchangeable_with_system_tar(site: Site) -> None:
    src = site.base / "src"
    src.mkdir()
    fill(src)
    theirs = site.base / "theirs.tar.gz"
    subprocess.run(["tar", "czf", str(theirs), "-C", str(src), "."], check=True)
    result = site.restore(theirs)
    assert (result.skipped, result.hardlinks) == ([], 1)
    assert shape(site.dest) == shape(src)
    ours = site.base / "ours.tar.gz"
    extracted = site.base / "by-tar"
    extracted.mkdir()
    backup_mod.backup(src, str(ours), CopyOptions(), S3Options())
    subprocess.run(["tar", "xzf", str(ours), "-C", str(extracted)], check=True)
    assert shape(extracted) == shape(src)


def test_backup_skips_specials_and_writes_atomically(site: Site) -> None:
    src = site.base / "src"
    src.mkdir()
    os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (src / "f").write_bytes(b"x")
    dest = site.base / "b.tar.gz"
    dest.write_bytes(b"previous good backup")
    os.chmod(src / "f", 0)
    result = backup_mod.backup(src, str(dest), CopyOptions(), S3Options())
    assert isinstance(result, archive_mod.ArchiveResult)
    assert result.skipped == ["./null: character device; not archived"]
    assert sorted(p.name for p in site.base.iterdir()) == ["b.tar.gz", "dest", "host", "src"]
    with tarfile.open(dest) as t:
        assert sorted(t.getnames()) == [".", "./f"]


# -- Debian's own Python (3.11.2: no extraction filters at all) -------------------------------

_DEBIAN_SCRIPT = r"""
import json, os, sys, tarfile
sys.path.insert(0, sys.argv[1])
from plugin.driver.archive import ArchiveError, extract_archive, write_archive
base = sys.argv[2]
src, dest, host = (os.path.join(base, n) for n in ("src", "dest", "host"))
out = {"version": list(sys.version_info[:3])}
written = write_archive(src, os.path.join(base, "b.tar.gz"))
out["written"] = [written.files, written.symlinks, written.skipped]
restored = extract_archive(os.path.join(base, "b.tar.gz"), dest)
out["restored"] = [restored.files, restored.symlinks, restored.skipped]
try:
    extract_archive(os.path.join(base, "hostile.tar.gz"), dest)
    out["hostile"] = "extracted"
except ArchiveError as exc:
    out["hostile"] = str(exc)
print(json.dumps(out))
"""


def test_under_debian_python_without_tarfile_filters(site: Site) -> None:
    python = Path("/usr/bin/python3")
    assert python.exists(), "/usr/bin/python3 is missing: scripts/setup installs python3"
    src = site.base / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.symlink("f", src / "l")
    os.mkfifo(src / "fifo")
    write_tar(
        site.base / "hostile.tar.gz",
        [member("h", tarfile.LNKTYPE, linkname=str(site.secret)), member("h", data=b"pwned")],
    )

    def outside() -> dict[str, tuple[object, ...]]:
        snap = site.snap()
        return {
            k: v for k, v in snap.items() if not k.startswith((str(src), str(site.base / "b.")))
        }

    before = outside()
    proc = subprocess.run(
        [str(python), "-I", "-c", _DEBIAN_SCRIPT, str(REPO), str(site.base)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["version"][:2] == [3, 11]
    assert out["written"] == [1, 1, ["./fifo: fifo; not archived"]]
    assert out["restored"] == [1, 1, []]
    assert "'h' is a hardlink to" in out["hostile"] and REFUSED in out["hostile"]
    assert (site.dest / "f").read_bytes() == b"data"
    assert os.readlink(site.dest / "l") == "f"
    assert outside() == before


# -- property: whatever the members, nothing outside changes ----------------------------------

# Mostly ordinary names, so that many archives pass the first pass and are extracted; now and
# then a '..', an over-long component, an absolute name or a path into the sentinel.
_COMPONENTS = ["a", "b", "c", "l", "a//b", "."] * 3 + ["d" * 250, ".."]
_part = st.sampled_from(_COMPONENTS)
_rel = st.lists(_part, min_size=1, max_size=4).map("/".join)
_hostile = st.sampled_from(["HOST/secret", "HOST", "/a", "e" * 256, "../../host/secret"])
_short = st.sampled_from(["f", "a", "b", "c", "l", "a/b", "../a", "l/.."])
_target = st.one_of(
    _short,
    _short,
    _short,
    _rel,
    _rel.map(lambda r: "../" + r),
    _rel.map(lambda r: "a/../" + r),
    _hostile,
)
_kind = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
    ]
)
_mode = st.one_of(
    st.sampled_from([0o644, 0o4755, 0o2755, 0o1777, 0o7777, 0]), st.integers(0, 0o7777)
)
_member = st.tuples(_rel, _kind, _target, _mode)
_one_hostile = st.one_of(st.none(), st.tuples(_hostile, _kind, _target, _mode))


def _insert(drawn: tuple[list[MemberSpec], MemberSpec | None, int]) -> list[MemberSpec]:
    members, extra, at = drawn
    members = [("f", tarfile.REGTYPE, "", 0o4755), *members]  # something to hardlink to
    return members if extra is None else [*members[:at], extra, *members[at:]]


# Ordinary members, and at most one with a hostile name, so half the archives get extracted.
_members = st.tuples(st.lists(_member, min_size=1, max_size=7), _one_hostile, st.integers(0, 7))


def _fix(name: str, host: Path) -> str:
    return name.replace("HOST", str(host))


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_members.map(_insert))
def test_property_nothing_outside_changes(members: list[MemberSpec]) -> None:
    with tempfile.TemporaryDirectory(prefix="stowage-archive-") as tmp:
        site = make_site(Path(tmp))
        built = [
            member(
                _fix(name, site.host),
                kind,
                data=b"payload",
                linkname=_fix(link, site.host),
                mode=mode,
                devmajor=1,
                devminor=3,
            )
            for name, kind, link, mode in members
        ]
        tar = write_tar(site.base / "x.tar", built)
        # links a container left in the volume, where the archive's names may land
        os.symlink(site.host, site.dest / "a")
        os.symlink("../host/secret", site.dest / "b")
        os.symlink("/", site.dest / "l")
        before = site.snap()
        try:
            extract_archive(tar, site.dest)
        except ArchiveError as exc:
            assert REFUSED in str(exc) or "holds part of the archive" in str(exc)
        assert site.snap() == before
        inodes: dict[tuple[int, int], int] = {}
        for rel, s in listing(site.dest).items():
            assert not s.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), rel
            assert stat.S_IFMT(s.st_mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), rel
            assert not rel.split("/")[-1].startswith(".stowage."), rel
            inodes[s.st_dev, s.st_ino] = inodes.get((s.st_dev, s.st_ino), 0) + 1
        # every hardlinked inode in dest has all its names in dest (none shared with host)
        for rel, s in listing(site.dest).items():
            if not stat.S_ISDIR(s.st_mode):
                assert s.st_nlink == inodes[s.st_dev, s.st_ino], rel


@pytest.mark.parametrize("dest", ["out.tar.gz", "out-tree"])
def test_volume_data_path_swapped_for_a_link_is_refused(site: Site, dest: str) -> None:
    """A path= volume's directory replaced by a symlink after Create: backup and restore
    refuse it instead of reading or writing wherever the link points."""
    (site.base / "elsewhere").mkdir()
    (site.base / "elsewhere" / "x").write_text("not the volume")
    swapped = site.base / "swapped"
    swapped.symlink_to(site.base / "elsewhere")
    with pytest.raises((BackupError, StagingError)):
        backup_mod.backup(swapped, str(site.base / dest), CopyOptions(), S3Options())
    assert not (site.base / dest).exists()
    tar = write_tar(site.base / "in.tar.gz", [member("planted", data=b"through the link")])
    with pytest.raises((BackupError, StagingError)):
        backup_mod.restore(str(tar), swapped, CopyOptions(), S3Options())
    assert sorted(os.listdir(site.base / "elsewhere")) == ["x"]


def test_archive_is_private_whatever_the_umask(site: Site) -> None:
    """A 0644 archive of a 0700 volume let any local user read the volume's data."""
    (site.dest / "secret.txt").write_text("private")
    os.chmod(site.dest, 0o700)
    old = os.umask(0o022)
    try:
        backup_mod.backup(site.dest, str(site.base / "b.tar.gz"), CopyOptions(), S3Options())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(site.base / "b.tar.gz").st_mode) == 0o600
