"""The dates S3 sends, in one place: ISO 8601 in XML documents (LastModified, Initiated) and
RFC 7231 in headers (Last-Modified). Everything is converted to integer nanoseconds since the
epoch; `seconds` gives the float the copy engine keeps. Garbled or missing values are 0, so
one odd answer never fails a listing."""

from __future__ import annotations

import calendar
import datetime
import email.utils

NS = 1_000_000_000


def parse_iso_date(value: str | None) -> int:
    """S3's ISO 8601 LastModified in nanoseconds (0 if missing or garbled)."""
    if not value:
        return 0
    try:
        dt = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp() * NS)


def parse_http_date(value: str | None) -> int:
    """A Last-Modified header in nanoseconds since the epoch (0 if missing or garbled)."""
    if not value:
        return 0
    parsed = email.utils.parsedate(value)
    if parsed is None:
        return 0
    return calendar.timegm(parsed) * NS


def from_datetime(value: object) -> int:
    """A datetime botocore parsed, in nanoseconds (0 for anything else)."""
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * NS)
    return 0


def seconds(ns: int) -> float:
    """Nanoseconds as float seconds (the engine's ObjectInfo unit)."""
    return ns / NS
