"""Local-to-local copies: tree fidelity, atomicity, skipping, resume, cancel, limits, CLI."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from stagingkit import build_tree, leftovers, snapshot, write_random

from plugin.staging import CopyOptions, Progress, SourceNotFoundError, copy
from plugin.staging.engine import temp_paths

MiB = 1 << 20
CHUNK = 1 * MiB


def test_tree_copy_keeps_everything(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree(src)
    result = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK, jobs=4))
    assert result.ok, result.errors
    assert snapshot(dst) == snapshot(src)
    assert leftovers(dst) == []
    assert result.files_failed == 0 and result.symlinks == 3
    # Holes of the sparse file are not moved, everything else is.
    assert 4 * MiB < result.bytes_copied < result.bytes_total


def test_sparse_file_stays_sparse(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with open(src / "sparse", "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(40 * MiB)
        fh.write(b"x" * 4096)
    result = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert result.ok, result.errors
    assert (dst / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 * MiB


def test_rerun_copies_nothing_then_only_the_change(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree(src)
    first = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert first.ok
    again = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert again.ok
    assert again.files_copied == 0 and again.bytes_copied == 0
    assert again.files_skipped == first.files_total
    (src / "small.txt").write_text("changed\n")
    third = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert third.files_copied == 1 and third.bytes_copied == len("changed\n")
    assert snapshot(dst) == snapshot(src)


def test_single_file_to_path_and_into_directory(tmp_path: Path) -> None:
    write_random(tmp_path / "f.bin", 3 * MiB + 5)
    res = copy(
        str(tmp_path / "f.bin"), str(tmp_path / "out" / "g.bin"), CopyOptions(chunk_size=CHUNK)
    )
    assert res.ok and (tmp_path / "out" / "g.bin").read_bytes() == (tmp_path / "f.bin").read_bytes()
    (tmp_path / "dir").mkdir()
    res = copy(str(tmp_path / "f.bin"), str(tmp_path / "dir"))
    assert res.ok and (tmp_path / "dir" / "f.bin").stat().st_size == 3 * MiB + 5
    assert leftovers(tmp_path) == []


def test_missing_source_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        copy(str(tmp_path / "nope"), str(tmp_path / "dst"))


def test_per_file_errors_are_collected_and_others_copied(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "b.txt").write_text("b")
    (dst / "b.txt").mkdir(parents=True)  # a directory in the way of a file
    result = copy(str(src), str(dst))
    assert not result.ok and result.state == "failed"
    assert result.files_copied == 1 and result.files_failed == 1
    assert [e.path for e in result.errors] == ["b.txt"]
    assert "directory" in result.errors[0].message
    assert (dst / "a.txt").read_text() == "a"


def test_progress_reports_totals(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree(src)
    seen: list[Progress] = []
    result = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK, progress=seen.append))
    last = seen[-1]
    assert last.state == "done"
    assert last.files_done == last.files_total == result.files_total
    assert last.bytes_done == last.bytes_total == result.bytes_total
    assert seen[0].state in ("scanning", "copying")


def test_bandwidth_limit_is_respected(tmp_path: Path) -> None:
    write_random(tmp_path / "f", 6 * MiB)
    start = time.monotonic()
    res = copy(
        str(tmp_path / "f"), str(tmp_path / "g"), CopyOptions(chunk_size=CHUNK, bwlimit=10 * MiB)
    )
    elapsed = time.monotonic() - start
    assert res.ok
    # 6 MiB at 10 MiB/s with a 1 MiB burst: at least ~0.5 s; unlimited it takes milliseconds.
    assert elapsed >= 0.45, elapsed


def test_cancel_keeps_no_partial_file_and_rerun_resumes(tmp_path: Path) -> None:
    src, dst = tmp_path / "big", tmp_path / "copy"
    write_random(src, 24 * MiB, seed=7)
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.bytes_done >= 8 * MiB:
            cancel.set()

    opts = CopyOptions(
        chunk_size=CHUNK,
        jobs=2,
        bwlimit=32 * MiB,
        cancel=cancel,
        progress=on_progress,
        progress_interval=0.01,
    )
    first = copy(str(src), str(dst), opts)
    assert first.state == "cancelled" and not first.ok
    assert not dst.exists()
    part, journal = temp_paths(str(dst))
    assert os.path.exists(part) and os.path.exists(journal)
    second = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert second.ok
    assert second.bytes_resumed >= 6 * MiB
    assert second.bytes_copied + second.bytes_resumed == 24 * MiB
    assert dst.read_bytes() == src.read_bytes()
    assert not os.path.exists(part) and not os.path.exists(journal)


def test_changed_source_invalidates_journal(tmp_path: Path) -> None:
    src, dst = tmp_path / "big", tmp_path / "copy"
    write_random(src, 4 * MiB, seed=1)
    part, journal = temp_paths(str(dst))
    # A journal from another version of the source (other mtime) claiming every chunk.
    with open(journal, "w") as fh:
        fh.write('{"chunk": 1048576, "mtime_ns": 1, "size": 4194304, "v": 1}\n0\n1\n2\n3\n')
    with open(part, "wb") as fh:
        fh.truncate(4 * MiB)
    res = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK))
    assert res.ok and res.bytes_resumed == 0
    assert dst.read_bytes() == src.read_bytes()


def test_cli_local_copy_and_usage_errors(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree(src)
    cmd = [
        sys.executable,
        "-m",
        "plugin.staging.cli",
        "cp",
        str(src),
        str(dst),
        "--chunk-size",
        "1M",
        "-j",
        "3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "done:" in proc.stderr
    assert snapshot(dst) == snapshot(src)
    bad = subprocess.run(
        [sys.executable, "-m", "plugin.staging.cli", "cp", str(tmp_path / "missing"), str(dst)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr
    scheme = subprocess.run(
        [sys.executable, "-m", "plugin.staging.cli", "cp", "gs://x/y", str(dst)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scheme.returncode == 2 and "unsupported scheme" in scheme.stderr


def test_kill9_tree_copy_then_rerun_ends_identical(tmp_path: Path) -> None:
    """kill -9 of `stowage cp` mid-tree (many small files and a chunked large one): no partial
    file under a final name, and the rerun resumes the large file's chunks and ends identical
    to the source (modes, mtimes, symlinks, empty directories)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree(src)
    for i in range(300):
        (src / "many" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / "many" / f"d{i % 3}" / f"f{i:03d}").write_bytes(os.urandom(i * 7))
    write_random(src / "zz-large.bin", 48 * MiB, seed=4)
    _, journal = temp_paths(str(dst / "zz-large.bin"))
    cmd = [sys.executable, "-m", "plugin.staging.cli", "cp", "--no-progress", "-q"]
    cmd += ["--chunk-size", "1M", "--bwlimit", "12M", "-j", "8", str(src), str(dst)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(journal) and os.path.getsize(journal) > 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the large file never started")
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -9
    assert not (dst / "zz-large.bin").exists()
    # Whatever did land under a final name is complete.
    for p in dst.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".stowage."):
            assert p.read_bytes() == (src / p.relative_to(dst)).read_bytes()
    result = copy(str(src), str(dst), CopyOptions(chunk_size=CHUNK, jobs=8))
    assert result.ok, result.errors
    assert result.bytes_resumed > 0
    assert snapshot(dst) == snapshot(src)
    assert leftovers(dst) == []


def test_short_writes_are_completed_not_counted_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filling disk first shows as a short pwrite; counting the bytes read instead left a
    torn file under its final name (found by the chaos tier on a full ext4)."""
    from plugin.staging import localfs

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    real_pwrite = os.pwrite
    monkeypatch.setattr(localfs, "_no_copy_file_range", True)  # the pread/pwrite path
    monkeypatch.setattr(
        localfs.os, "pwrite", lambda fd, data, pos: real_pwrite(fd, bytes(data)[:1000], pos)
    )
    result = copy(f"{src}/", f"{dst}/", CopyOptions())
    assert result.ok, result.errors
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()


def test_a_failed_whole_file_copy_leaves_no_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugin.staging import localfs

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(localfs, "copy_range", full)
    result = copy(f"{src}/", f"{dst}/", CopyOptions())
    assert not result.ok
    assert os.listdir(dst) == [], "a failed copy's part file takes the space a retry needs"


def test_a_whole_file_copy_removes_an_earlier_chunked_runs_journal(tmp_path: Path) -> None:
    """An interrupted chunked copy leaves .part and .journal; a rerun that copies the file
    whole (a larger chunk size) removed the part but left the journal forever."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    (dst / ".stowage.f.part").write_bytes(b"\0" * 300_000)
    (dst / ".stowage.f.journal").write_text('{"v": 1}\n0\n')
    result = copy(f"{src}/", f"{dst}/", CopyOptions(chunk_size=1 << 20))
    assert result.ok, result.errors
    assert sorted(os.listdir(dst)) == ["f"]
