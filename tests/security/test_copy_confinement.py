"""The copy engine never writes or reads outside its roots, whatever the trees hold.

Attacks of the security issue covered here at the engine level (the real-dockerd variant of
attack 1 is in test_dockerd_escape.py):
1. a link planted in the destination (by a container, or by a bucket writer's symlink object)
   where the source has a directory or a file;
4. a source directory flipping between a directory and a link to outside while stage-in runs;
5. bucket metadata asking for setuid files, device types and other owners.
Each fails on the engine before confinement (a4feee9^): it followed links by path.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin.s3.metadata import sanitize as sanitize_object_meta
from plugin.s3.store import ObjectInfo, Sink
from plugin.staging import CopyOptions, copy
from plugin.staging.locations import LocalLocation, S3Location

SECRET = b"host secret, must never reach a volume\n"


def sentinel_snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Names, inodes, modes and contents of everything under *root* (links not followed)."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            body: bytes | str | None = None
            if stat.S_ISREG(st_.st_mode):
                body = Path(path).read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.readlink(path)
            out[os.path.relpath(path, root)] = (st_.st_ino, st_.st_mode, body)
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    """A host directory outside every root, with a file in it; unchanged after each test."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_bytes(SECRET)
    before = sentinel_snapshot(host)
    yield host
    assert sentinel_snapshot(host) == before, "something was written outside the destination"


def _opts(**kw: object) -> CopyOptions:
    return CopyOptions(**{"chunk_size": 64 * 1024, "jobs": 2, "retries": 0, **kw})  # type: ignore[arg-type]


# -- attack 1: a link planted in the destination -------------------------------------------------


def test_planted_directory_link_is_replaced_not_followed(tmp_path: Path, sentinel: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "conf").mkdir(parents=True)
    (src / "conf" / "a.txt").write_text("from source\n")
    (src / "conf" / "big").write_bytes(os.urandom(300 * 1024))  # the chunked path too
    dst.mkdir()
    os.symlink(sentinel, dst / "conf")  # `rm -rf /d/conf && ln -s /host /d/conf`
    result = copy(f"{src}/", f"{dst}/", _opts())
    assert result.ok, result.errors
    assert (dst / "conf").is_dir() and not (dst / "conf").is_symlink()
    assert (dst / "conf" / "a.txt").read_text() == "from source\n"
    assert (dst / "conf" / "big").read_bytes() == (src / "conf" / "big").read_bytes()


def test_planted_file_link_is_replaced_not_written_through(tmp_path: Path, sentinel: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "conf").mkdir(parents=True)
    (src / "conf" / "a.txt").write_text("from source\n")
    (dst / "conf").mkdir(parents=True)
    os.symlink(sentinel / "passwd", dst / "conf" / "a.txt")
    # The part file name too: a link there must be replaced, not opened.
    os.symlink(sentinel / "passwd", dst / "conf" / ".stowage.a.txt.part")
    result = copy(f"{src}/", f"{dst}/", _opts(skip_unchanged=False))
    assert result.ok, result.errors
    assert not (dst / "conf" / "a.txt").is_symlink()
    assert (dst / "conf" / "a.txt").read_text() == "from source\n"


def test_fifo_planted_at_a_part_name_does_not_block_the_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("data")
    dst.mkdir()
    os.mkfifo(dst / ".stowage.f.part")  # opening it for writing would block forever
    done = threading.Event()
    result_box: list[object] = []

    def run() -> None:
        result_box.append(copy(f"{src}/", f"{dst}/", _opts()))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20), "the copy blocked on a planted fifo"
    assert (dst / "f").read_text() == "data"


class MemoryBucket:
    """Just enough of an ObjectStore for downloads: what a bucket writer controls."""

    endpoint = "memory://"

    def __init__(self, objects: Mapping[str, tuple[bytes, Mapping[str, str]]]) -> None:
        self.objects = dict(objects)

    def _info(self, key: str) -> ObjectInfo:
        body, meta = self.objects[key]
        return ObjectInfo(key, len(body), hashlib.md5(body).hexdigest(), 1.6e9, meta)

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        return self._info(key) if key in self.objects else None

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield self._info(key)

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        body = self.objects[key][0]
        end = len(body) if length is None else start + length
        sink(start, memoryview(body[start:end]))
        return self._info(key)

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        return [None] * len(keys)

    def close(self) -> None:
        pass

    def is_transient(self, exc: BaseException) -> bool:
        return False

    def is_unreachable(self, exc: BaseException) -> bool:
        return False


LINK_MODE = str(stat.S_IFLNK | 0o777)


def _download(bucket: MemoryBucket, dst: Path, **kw: object) -> object:
    return copy(S3Location("b", "p/"), LocalLocation(str(dst), True), _opts(**kw), store=bucket)  # type: ignore[arg-type]


def test_bucket_symlink_object_then_key_beneath_it(tmp_path: Path, sentinel: Path) -> None:
    """An s3fs symlink object `p/lnk` -> the host dir, then `p/lnk/x`: the first copy makes
    the link, a second copy (a refreshed stage-in, a second `stowage cp`) must not write x
    through it."""
    dst = tmp_path / "dst"
    first = MemoryBucket({"p/lnk": (str(sentinel).encode(), {"mode": LINK_MODE})})
    _download(first, dst)
    assert os.readlink(dst / "lnk") == str(sentinel)
    second = MemoryBucket({"p/lnk/x": (b"planted\n", {}), "p/lnk/passwd": (b"owned\n", {})})
    _download(second, dst, skip_unchanged=False)
    assert (dst / "lnk").is_dir() and not (dst / "lnk").is_symlink()
    assert (dst / "lnk" / "x").read_bytes() == b"planted\n"


def test_setuid_and_device_metadata_give_plain_files(tmp_path: Path) -> None:
    """Attack 5: `x-amz-meta-mode: 0o104755` with uid=0 made a setuid-root file."""
    dst = tmp_path / "dst"
    bucket = MemoryBucket(
        {
            "p/suid": (b"#!/bin/sh\n", {"mode": str(0o104755), "uid": "0", "gid": "0"}),
            "p/sgid": (b"x", {"mode": str(0o102755)}),
            "p/chr": (b"x", {"mode": str(stat.S_IFCHR | 0o666)}),
            "p/fifo": (b"x", {"mode": str(stat.S_IFIFO | 0o644)}),
            "p/owned": (b"x", {"mode": str(0o100640), "uid": "4242", "gid": "4243"}),
            "p/garbage": (b"x", {"mode": "rwx", "uid": "-5", "gid": "1e9", "mtime": "never"}),
            "p/huge": (b"x", {"mode": str(2**40), "uid": str(2**40), "gid": "7"}),
        }
    )
    result = _download(bucket, dst)
    assert result.ok, result.errors  # type: ignore[attr-defined]
    for name in ("suid", "sgid", "chr", "fifo", "owned", "garbage", "huge"):
        st_ = os.lstat(dst / name)
        assert stat.S_ISREG(st_.st_mode), name
        assert not st_.st_mode & 0o7000, name
        assert (st_.st_uid, st_.st_gid) == (os.geteuid(), os.getegid()), name
    assert stat.S_IMODE(os.lstat(dst / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dst / "owned").st_mode) == 0o640


def test_bucket_owners_only_when_asked(tmp_path: Path) -> None:
    bucket = MemoryBucket({"p/owned": (b"x", {"mode": str(0o100640), "uid": "4242", "gid": "43"})})
    _download(bucket, tmp_path / "asked", preserve_owner=True)
    st_ = os.lstat(tmp_path / "asked" / "owned")
    assert (st_.st_uid, st_.st_gid) == (4242, 43)
    _download(bucket, tmp_path / "volume-owner", owner=(1000, 1001))
    st_ = os.lstat(tmp_path / "volume-owner" / "owned")
    assert (st_.st_uid, st_.st_gid) == (1000, 1001)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["mode", "uid", "gid", "mtime", "Mode"]), st.text()))
def test_any_metadata_reads_as_an_ordinary_file(meta: dict[str, str]) -> None:
    got = sanitize_object_meta(meta)
    assert stat.S_IFMT(got.mode) in (stat.S_IFREG, stat.S_IFLNK)
    assert not got.mode & 0o7000
    assert -1 <= got.uid <= 2**32 - 2 and -1 <= got.gid <= 2**32 - 2
    assert got.mtime_ns is None or 0 <= got.mtime_ns < 2**63


# -- hostile trees (property) -------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "conf", ".stowage.a.part", ".stowage.a.journal"])
RELS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    planted=st.lists(st.tuples(RELS, st.sampled_from(["dir-link", "file-link", "fifo", "dir"]))),
    files=st.lists(RELS, min_size=1, max_size=6),
)
def test_hostile_destination_trees_never_lead_outside(
    tmp_path_factory: pytest.TempPathFactory,
    planted: list[tuple[str, str]],
    files: list[str],
) -> None:
    base = tmp_path_factory.mktemp("prop")
    host, src, dst = base / "host", base / "src", base / "dst"
    host.mkdir()
    (host / "passwd").write_bytes(SECRET)
    src.mkdir()
    for rel in files:
        path = src / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rel.encode())
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue  # a name both file and directory in one tree
    dst.mkdir()
    for rel, kind in planted:
        path = dst / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir-link":
                os.symlink(host, path)
            elif kind == "file-link":
                os.symlink(host / "passwd", path)
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                path.mkdir()
        except OSError:
            continue
    before = sentinel_snapshot(host)  # after planting: planting itself may go through links
    copy(f"{src}/", f"{dst}/", _opts(skip_unchanged=False))
    assert sentinel_snapshot(host) == before
    for dirpath, _dirs, names in os.walk(dst):
        for name in names:
            st_ = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st_.st_mode):
                assert Path(dirpath, name).read_bytes() != SECRET


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4))
def test_hostile_keys_are_written_beneath_the_destination_or_skipped(parts: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        dst = base / "d" / "dst"
        dst.mkdir(parents=True)
        key = "p/" + "/".join(parts)
        bucket = MemoryBucket({key: (b"x", {})})
        try:
            _download(bucket, dst)
        except Exception as exc:  # a key that cannot be a file is refused with a message
            assert str(exc)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                assert path in (base / "d", dst) or dst in path.parents, path


# -- attack 4: a source directory flipping while we copy ----------------------------------------


def test_flipping_source_directory_never_copies_outside_files(tmp_path: Path) -> None:
    """`stage_in=/allowed/race` while `race/sub` flips between a directory and a link to
    outside: a host file was copied into the volume within 9 mounts. 200+ swaps here."""
    race = tmp_path / "allowed" / "race"
    outside = tmp_path / "outside"  # holds a file of the same name as the inside one
    outside.mkdir()
    (outside / "passwd").write_bytes(SECRET)
    (race / "sub").mkdir(parents=True)
    for i in range(30):
        (outside / f"f{i}").write_bytes(SECRET)
        (race / "sub" / f"f{i}").write_text("inside\n")
    (race / "other.txt").write_text("x")
    real_sub, link_tmp = race / "sub.real", race / "sub.link"
    stop = threading.Event()
    swaps = [0]

    def flipper() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            # directory -> link to outside -> directory, each an atomic rename
            os.rename(race / "sub", real_sub)
            os.symlink(outside, link_tmp)
            os.rename(link_tmp, race / "sub")
            time.sleep(0.001)  # each state lasts long enough for the copy to meet it
            os.unlink(race / "sub")
            os.rename(real_sub, race / "sub")
            swaps[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    leaked: list[str] = []
    try:
        rounds, deadline = 0, time.monotonic() + 15
        while (swaps[0] < 200 or rounds < 150) and time.monotonic() < deadline:
            rounds += 1
            dst = tmp_path / f"vol{rounds % 4}"
            src = LocalLocation(str(race), trailing_slash=True, no_symlinks=True)
            result = copy(src, LocalLocation(str(dst), True), _opts(skip_unchanged=False))
            for err in result.errors:  # an outside name must not even be listed
                if "passwd" in err.path or "passwd" in err.message or str(outside) in err.message:
                    leaked.append(f"{err.path}: {err.message}")
            for dirpath, _dirs, names in os.walk(dst):  # links are not followed
                for name in names:
                    path = Path(dirpath, name)
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        assert path.read_bytes() != SECRET, f"host file copied into {path}"
    finally:
        stop.set()
        thread.join(10)
    assert swaps[0] >= 200, f"only {swaps[0]} swaps happened"
    assert not leaked, leaked
