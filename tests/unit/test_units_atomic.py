"""The shared byte formatter, seconds parser and atomic writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin.atomic import write_atomically
from plugin.units import format_bytes, parse_seconds


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@given(st.text(max_size=30))
def test_parse_seconds_accepts_only_numbers_in_range(value: str) -> None:
    try:
        seconds = parse_seconds(value, 1, 120)
    except ValueError as exc:
        assert "seconds" in str(exc)
    else:
        assert 1 <= seconds <= 120


def test_parse_seconds_names_the_reason() -> None:
    with pytest.raises(
        ValueError, match=r"1 to 120 seconds, got '500' \(Docker gives Mount two minutes\)"
    ):
        parse_seconds("500", 1, 120, why="Docker gives Mount two minutes")
    with pytest.raises(ValueError, match="nan"):
        parse_seconds("nan", 1, 120)


def test_write_atomically_replaces_whole_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    (tmp_path / ".state.json.tmp").write_bytes(b"stale temp from a crash")
    os.chmod(tmp_path / ".state.json.tmp", 0o666)
    write_atomically(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
