"""Parsing of copy endpoints: a local path or `s3://bucket/prefix`."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from plugin.staging.errors import InvalidLocationError


@dataclass(frozen=True)
class LocalLocation:
    path: str
    #: The user wrote a trailing slash: the path is meant as a directory.
    trailing_slash: bool = False
    #: The path was resolved (realpath) and checked by the caller, e.g. against the daemon's
    #: allowed paths: it is opened with no symlink followed anywhere in it, so a component
    #: swapped for a link since the check is refused instead of followed.
    no_symlinks: bool = False

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    #: Key or key prefix without a leading slash; may be empty (whole bucket).
    key: str

    @property
    def trailing_slash(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def dir_prefix(self) -> str:
        """The key prefix under which a tree lives: '' or ending with '/'."""
        return "" if self.key in ("", "/") else self.key.rstrip("/") + "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Location = LocalLocation | S3Location


def parse_location(text: str) -> Location:
    """Turn a CLI argument into a location; raises InvalidLocationError with a usage hint."""
    if not text:
        raise InvalidLocationError("empty path: give a local path or s3://bucket/prefix")
    if text.lower().startswith("s3://"):
        rest = text[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidLocationError(f"{text!r} has no bucket: use s3://bucket/prefix")
        return S3Location(bucket=bucket, key=key)
    if "://" in text:
        raise InvalidLocationError(
            f"unsupported scheme in {text!r}: use a local path or s3://bucket/prefix"
        )
    return LocalLocation(path=os.path.abspath(text), trailing_slash=text.endswith("/"))


def safe_relpath(rel: str) -> bool:
    """True if *rel* (posix, from an S3 key) stays inside the destination directory.

    Keys are chosen by whoever wrote the bucket; `../x` or `a//b` must not escape or alias.
    """
    if not rel or rel.startswith("/") or "\0" in rel:
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and posixpath.normpath(rel) == rel
