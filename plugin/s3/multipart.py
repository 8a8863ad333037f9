"""Uploading a file descriptor's bytes as one multipart upload through a boto3 client, parts
in parallel, aborted on any failure (the FUSE filesystem's large-file flush). The copy engine
has its own resumable uploader on the ObjectStore protocol (plugin.staging), which keeps
parts across interruptions; both size parts with the same S3 limits (plugin.s3.store)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Mapping
from typing import Any

from plugin.s3.store import MAX_PARTS

log = logging.getLogger(__name__)


def upload_fd(
    client: Any,
    bucket: str,
    key: str,
    fd: int,
    size: int,
    metadata: Mapping[str, str],
    content_type: str | None,
    *,
    part_size: int,
    concurrency: int,
) -> str | None:
    """Upload bytes `[0, size)` of *fd* to *key*; the new object's ETag (as S3 quotes it).
    Blocking. Parts grow beyond *part_size* when the file would need over MAX_PARTS."""
    part_size = max(part_size, -(-size // MAX_PARTS))
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Metadata": dict(metadata)}
    if content_type:
        kwargs["ContentType"] = content_type
    upload_id = client.create_multipart_upload(**kwargs)["UploadId"]

    def _part(number: int) -> dict[str, Any]:
        offset = (number - 1) * part_size
        data = os.pread(fd, min(part_size, size - offset), offset)
        r = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": r["ETag"]}

    count = -(-size // part_size)
    try:
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="upload-part"
        ) as pool:
            parts = list(pool.map(_part, range(1, count + 1)))
        r = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # best effort: the original error matters more
            log.warning("abort of multipart upload %s for %s failed: %s", upload_id, key, exc)
        raise
    log.debug("multipart upload of %s: %d parts of %d bytes", key, count, part_size)
    etag = r.get("ETag")
    return str(etag) if etag else None
