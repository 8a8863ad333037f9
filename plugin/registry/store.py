"""The registry's objects in S3: one per volume (`PREFIX/volumes/<encoded name>.json`) and one
per staged-volume lease (`PREFIX/leases/<encoded name>.json`).

Why one object per volume: a Create or Remove is then one PUT or DELETE, never a
read-modify-write of a shared index that two hosts could interleave, and a LIST of the prefix
is the whole registry.

Uniqueness rests on conditional writes: `If-None-Match: *` (create only if absent) and
`If-Match: <ETag>` (replace only what was read). AWS S3, MinIO and moto's server honour them;
some S3-compatible servers (`rclone serve s3`) ignore them. That is probed once: where they are
ignored, a write is followed by a read-back after SETTLE_S, and the object's content (last
writer wins, which every host then reads alike) decides; docs/several-hosts.md states the
weaker guarantee.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from plugin.errors import BackendError
from plugin.names import decode_name, encode_name
from plugin.s3 import client as s3client

log = logging.getLogger(__name__)

#: Without conditional writes: how long a writer waits before reading back who won.
SETTLE_S = 1.0
_PRECONDITION_CODES = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})
_UNSUPPORTED_CODES = frozenset({"501", "NotImplemented"})


class RegistryUnavailableError(BackendError):
    """The registry's S3 endpoint did not answer, or refused us."""


@dataclass(frozen=True)
class Stored:
    """An object's content and the ETag it was read with."""

    doc: dict[str, Any]
    etag: str


def split_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class RegistryStore:
    """Thread-safe access to the registry objects; every failure is RegistryUnavailableError."""

    def __init__(self, url: str, settings: s3client.S3Settings) -> None:
        self.url = url
        self.bucket, self.prefix = split_url(url)
        self._client = s3client.make_s3_client(settings)
        self._lock = threading.Lock()
        self._conditional: bool | None = None

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}/{encode_name(name)}.json"

    # -- conditional write support -------------------------------------------------------------

    @property
    def conditional(self) -> bool:
        """Whether the server honours If-None-Match/If-Match on PUT (asked once)."""
        with self._lock:
            if self._conditional is None:
                self._conditional = self._probe()
                log.info(
                    "registry %s: conditional writes %s",
                    self.url,
                    "supported" if self._conditional else "NOT supported (read-back instead)",
                )
            return self._conditional

    def _probe(self) -> bool:
        key = f"{self.prefix}probe/{secrets.token_hex(8)}"
        try:
            self._call("put_object", Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            except botocore.exceptions.ClientError as exc:
                return s3client.error_code(exc) in _PRECONDITION_CODES
            return False  # the second create-if-absent succeeded: the header was ignored
        except _UnsupportedError:
            return False
        finally:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc:  # a leftover probe object is harmless
                log.debug("registry probe cleanup failed: %s", exc)

    # -- volumes -------------------------------------------------------------------------------

    def list_volumes(self) -> dict[str, str]:
        """{volume name: ETag} of every volume object."""
        found: dict[str, str] = {}
        base = f"{self.prefix}volumes/"
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                if key.endswith(".json"):
                    found[decode_name(key[len(base) : -len(".json")])] = str(obj.get("ETag", ""))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found

    def get_volume(self, name: str) -> Stored | None:
        return self._get(self._key("volumes", name))

    def create_volume(self, name: str, doc: dict[str, Any]) -> Stored:
        """Write `doc` unless the volume exists; returns the stored record (ours, or the one
        that was there first: the caller compares)."""
        return self._create(self._key("volumes", name), doc)

    def delete_volume(self, name: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self._key("volumes", name))

    # -- leases --------------------------------------------------------------------------------

    def get_lease(self, name: str) -> Stored | None:
        return self._get(self._key("leases", name))

    def write_lease(self, name: str, doc: dict[str, Any], etag: str | None) -> bool:
        """Replace the lease read with `etag` (None: create it, it must not exist). False if
        another host wrote it in between."""
        key = self._key("leases", name)
        if etag is None:
            stored = self._create(key, doc)
            return stored.doc.get("nonce") == doc.get("nonce")
        if self.conditional:
            try:
                self._put(key, doc, IfMatch=etag)
            except _PreconditionFailedError:
                return False
            return True
        current = self._get(key)
        if current is None or current.etag != etag:
            return False
        return self._put_and_read_back(key, doc)

    def delete_lease(self, name: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self._key("leases", name))

    # -- plumbing ------------------------------------------------------------------------------

    def _create(self, key: str, doc: dict[str, Any]) -> Stored:
        doc = {**doc, "nonce": doc.get("nonce") or secrets.token_hex(8)}
        if self.conditional:
            try:
                etag = self._put(key, doc, IfNoneMatch="*")
                return Stored(doc, etag)
            except _PreconditionFailedError:
                existing = self._get(key)
                if existing is None:  # deleted meanwhile: try once more
                    return Stored(doc, self._put(key, doc, IfNoneMatch="*"))
                return existing
        existing = self._get(key)
        if existing is not None:
            return existing
        self._put_and_read_back(key, doc)
        final = self._get(key)
        return final if final is not None else Stored(doc, "")

    def _put_and_read_back(self, key: str, doc: dict[str, Any]) -> bool:
        """The weaker path: PUT, wait for concurrent writers to land, read back. Every host
        reads the same last writer, so all agree on one winner."""
        self._put(key, doc)
        time.sleep(SETTLE_S)
        final = self._get(key)
        return final is not None and final.doc.get("nonce") == doc.get("nonce")

    def _put(self, key: str, doc: dict[str, Any], **conditions: str) -> str:
        body = json.dumps(doc, sort_keys=True).encode()
        reply = self._call(
            "put_object",
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
            **conditions,
        )
        return str(reply.get("ETag", ""))

    def _get(self, key: str) -> Stored | None:
        try:
            reply = self._call("get_object", Bucket=self.bucket, Key=key)
        except _NotFoundError:
            return None
        raw = reply["Body"].read()
        try:
            doc = json.loads(raw)
        except ValueError:
            log.warning("registry object %s is not JSON; ignored", key)
            return None
        return Stored(doc if isinstance(doc, dict) else {}, str(reply.get("ETag", "")))

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = s3client.error_code(exc)
            if code in _PRECONDITION_CODES:
                raise _PreconditionFailedError() from exc
            if s3client.is_not_found(exc):
                raise _NotFoundError() from exc
            if code in _UNSUPPORTED_CODES:
                raise _UnsupportedError() from exc
            raise RegistryUnavailableError(
                f"registry {self.url}: {method} failed: {code or exc}"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise RegistryUnavailableError(f"registry {self.url} is unreachable: {exc}") from exc


class _PreconditionFailedError(Exception):
    pass


class _NotFoundError(Exception):
    pass


class _UnsupportedError(Exception):
    pass
