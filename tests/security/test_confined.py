"""plugin.confined.Tree itself, with openat2 and with the component-walk fallback (kernels
before 5.6, seccomp filters that refuse openat2): names beneath a root never lead out of it,
also while another thread swaps a directory for a symlink as fast as it can."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin import confined
from plugin.confined import Tree, UnsafePathError

SECRET = b"outside\n"


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":
        monkeypatch.setattr(confined, "_openat2_missing", True)
    else:
        monkeypatch.setattr(confined, "_openat2_missing", False)
    yield str(request.param)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("inside\n")
    outside.mkdir()
    (outside / "f").write_bytes(SECRET)
    return root, outside


def test_links_beneath_the_root_are_never_followed(
    resolver: str, layout: tuple[Path, Path]
) -> None:
    root, outside = layout
    (root / "out").symlink_to(outside)
    (root / "rel").symlink_to("../outside")
    (root / "d" / "lf").symlink_to(outside / "f")
    with Tree.at(root) as tree:
        for rel in ("out/f", "rel/f", "d/lf"):
            with pytest.raises(OSError) as raised:
                os.close(tree.open(rel, os.O_RDONLY))
            assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR), rel
            with pytest.raises(OSError):
                os.close(tree.open_file(rel))
        with pytest.raises(UnsafePathError):
            tree.open_dir("out")
        with pytest.raises(ValueError, match=r"'\.\.'"):
            tree.open("../outside/f", os.O_RDONLY)
        with pytest.raises(ValueError, match="absolute"):
            tree.open("/etc/passwd", os.O_RDONLY)
        with pytest.raises(UnsafePathError):
            tree.create_file("out/new")
        assert tree.makedirs("out/sub")  # the link is replaced by a directory
        tree.unlink("d/lf")  # the link itself goes
        tree.rename("d/f", "rel")  # renamed over the link, not through it
    assert (root / "out").is_dir() and not (root / "out").is_symlink()
    assert (root / "rel").read_text() == "inside\n"
    assert sorted(os.listdir(outside)) == ["f"] and (outside / "f").read_bytes() == SECRET


def test_a_fifo_or_device_is_never_opened(resolver: str, layout: tuple[Path, Path]) -> None:
    root, _ = layout
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    with Tree.at(root) as tree:
        for rel in ("fifo", "null"):
            with pytest.raises(UnsafePathError, match="not a regular file"):
                tree.open_file(rel)  # would block (fifo) or open a device driver
            os.close(tree.create_file(rel))  # replaced by a regular file
    assert (root / "fifo").read_bytes() == b"" and (root / "null").is_file()


def test_resolution_holds_while_a_directory_is_swapped_for_a_link(
    resolver: str, layout: tuple[Path, Path]
) -> None:
    """A few hundred swaps of root/d between the directory and a link to outside, while
    reads, creates and walks run: every open is of the inside file or refused."""
    root, outside = layout
    stop, swaps = threading.Event(), [0]

    def swapper() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            os.rename(root / "d", root / "d.real")
            os.symlink(outside, root / "d.link")
            os.rename(root / "d.link", root / "d")
            time.sleep(0.0005)
            os.unlink(root / "d")
            os.rename(root / "d.real", root / "d")
            swaps[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    opened = refused = 0
    try:
        with Tree.at(root) as tree:
            deadline = time.monotonic() + 15
            while (swaps[0] < 300 or opened < 50) and time.monotonic() < deadline:
                try:
                    fd = tree.open_file("d/f")
                except OSError:
                    refused += 1
                else:
                    with open(fd, "rb") as fh:
                        assert fh.read() == b"inside\n"
                    opened += 1
                with contextlib.suppress(OSError):
                    os.close(tree.create_file("d/new"))
                for rel, _st in tree.walk(lambda rel, exc: None):
                    assert not rel.startswith("d/") or rel in ("d/f", "d/new"), rel
    finally:
        stop.set()
        thread.join(10)
    assert swaps[0] >= 300, f"only {swaps[0]} swaps"
    assert opened and refused, (opened, refused)
    assert sorted(os.listdir(outside)) == ["f"] and (outside / "f").read_bytes() == SECRET
