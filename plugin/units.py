"""Bytes and seconds as users read and write them: one formatter, one seconds parser."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB; binary units, as `docker system df` uses."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_seconds(value: str, low: float = 0.0, high: float = 86400.0, why: str = "") -> float:
    """A number of seconds between *low* and *high*; *why* explains the bound in the error."""
    try:
        seconds = float(value.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if seconds != seconds or not low <= seconds <= high:  # NaN fails every comparison
        bound = f"expected {low:g} to {high:g} seconds, got {value.strip()!r}"
        raise ValueError(f"{bound} ({why})" if why else bound)
    return seconds
