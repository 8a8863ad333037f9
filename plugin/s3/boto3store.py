"""ObjectStore on boto3: the correct, portable baseline (and the control plane for any faster
byte path). botocore's own retries are off: the engine retries and resumes. Metadata goes out
through the s3fs codec (`plugin.s3.metadata.canonical`), whoever built it."""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import botocore.exceptions  # type: ignore[import-untyped,unused-ignore]

from plugin.s3.client import S3Settings, make_s3_client
from plugin.s3.dates import from_datetime, seconds
from plugin.s3.errors import error_code, is_not_found, is_temp_failure
from plugin.s3.metadata import canonical
from plugin.s3.store import (
    STREAM_BUFSIZE,
    ObjectInfo,
    PartInfo,
    Sink,
    UploadInfo,
    checksum_from_boto3,
)

log = logging.getLogger(__name__)


def _ts(value: Any) -> float:
    return seconds(from_datetime(value))


def _meta(raw: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in (raw or {}).items()}


class DeleteFailedError(Exception):
    """DeleteObjects answered 200 but listed keys it could not delete."""


class Boto3Store:
    """ObjectStore on a boto3 client (botocore's own retries off: the engine retries)."""

    def __init__(self, settings: S3Settings | None = None, client: Any = None) -> None:
        # Credentials: botocore's whole chain, as the process's environment configures it
        # (keys, shared files and profiles, web identity, SSO, container credentials, the
        # instance metadata service). Nothing here may switch a source off or write to
        # os.environ: that would reach every later client in the daemon and every FUSE
        # process it starts, and on a host whose only credentials are its role, fail them all.
        settings = settings or S3Settings()
        self.endpoint = settings.endpoint_url or "AWS S3"
        self._client = client or make_s3_client(dataclasses.replace(settings, max_attempts=1))

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            r = self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            etag=r.get("ETag", ""),
            last_modified=_ts(r.get("LastModified")),
            metadata=_meta(r.get("Metadata")),
            checksum=checksum_from_boto3(r),
        )

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    key=obj["Key"],
                    size=int(obj["Size"]),
                    etag=obj.get("ETag", ""),
                    last_modified=_ts(obj.get("LastModified")),
                )

    def close(self) -> None:
        """Nothing to release: botocore's pool closes with the client."""

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        return [None] * len(keys)  # botocore has no pipelining: one `get` each

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        else:
            # A whole object's stored CRC comes with it (S3 returns none for a range).
            kwargs["ChecksumMode"] = "ENABLED"
        r = self._client.get_object(**kwargs)
        body = r["Body"]
        buf = bytearray(STREAM_BUFSIZE)
        view = memoryview(buf)
        offset = start
        try:
            while True:
                n = body.readinto(buf)
                if not n:
                    break
                sink(offset, view[:n])
                offset += n
        finally:
            body.close()
        expected = int(r.get("ContentLength", offset - start))
        if offset - start != expected:
            raise botocore.exceptions.IncompleteReadError(
                actual_bytes=offset - start, expected_bytes=expected
            )
        size = expected
        content_range = r.get("ContentRange")
        if content_range and "/" in content_range:
            total = content_range.rsplit("/", 1)[1]
            if total.isdigit():
                size = int(total)
        return ObjectInfo(
            key=key,
            size=size,
            etag=r.get("ETag", ""),
            last_modified=_ts(r.get("LastModified")),
            metadata=_meta(r.get("Metadata")),
            checksum=None if "Range" in kwargs else checksum_from_boto3(r),
        )

    def put(self, bucket: str, key: str, data: bytes, metadata: Mapping[str, str]) -> str:
        r = self._client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=canonical(metadata))
        return str(r.get("ETag", ""))

    def create_multipart(self, bucket: str, key: str, metadata: Mapping[str, str]) -> str:
        r = self._client.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata=canonical(metadata)
        )
        return str(r["UploadId"])

    def list_uploads(self, bucket: str, key: str) -> list[UploadInfo]:
        try:
            r = self._client.list_multipart_uploads(Bucket=bucket, Prefix=key)
        except botocore.exceptions.ClientError as exc:
            # rclone's gofakes3 answers "no uploads under this prefix" with NoSuchUpload.
            if error_code(exc) == "NoSuchUpload":
                return []
            raise
        return [
            UploadInfo(upload_id=u["UploadId"], initiated=_ts(u.get("Initiated")))
            for u in r.get("Uploads", [])
            if u.get("Key") == key
        ]

    def list_parts(self, bucket: str, key: str, upload_id: str) -> dict[int, PartInfo]:
        parts: dict[int, PartInfo] = {}
        paginator = self._client.get_paginator("list_parts")
        for page in paginator.paginate(Bucket=bucket, Key=key, UploadId=upload_id):
            for p in page.get("Parts", []):
                n = int(p["PartNumber"])
                parts[n] = PartInfo(number=n, size=int(p["Size"]), etag=p.get("ETag", ""))
        return parts

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes, md5: bytes | None
    ) -> str:
        extra = {"ContentMD5": base64.b64encode(md5).decode()} if md5 is not None else {}
        r = self._client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, **extra
        )
        return str(r["ETag"])

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str:
        r = self._client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
        )
        return str(r.get("ETag", ""))

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        if not keys:
            return
        if len(keys) > 1000:
            raise ValueError("DeleteObjects takes at most 1,000 keys")
        r = self._client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
        errors = r.get("Errors") or []
        if errors:
            first = errors[0]
            raise DeleteFailedError(
                f"{len(errors)} of {len(keys)} deletes failed, first {first.get('Key')!r}: "
                f"{first.get('Code')} {first.get('Message', '')}".rstrip()
            )

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, botocore.exceptions.IncompleteReadError | ConnectionError):
            return True
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return False
        return is_temp_failure(exc) or isinstance(
            exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError
        )

    def is_unreachable(self, exc: BaseException) -> bool:
        return isinstance(
            exc,
            botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError,
        )
