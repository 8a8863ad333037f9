"""The S3 access the copy engine needs, behind a small interface so a faster client can
replace boto3 for the byte path without touching the engine, and S3's limits.

Implementations: `plugin.s3.boto3store` (portable) and `plugin.s3.crtstore` (the fast path,
with awscrt when installed), imported only when S3 is involved.
Every method makes exactly one attempt: retries (with backoff, and resuming a ranged GET
where its stream broke) live in the engine, which knows how many bytes already landed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

#: S3 allows at most this many parts per multipart upload.
MAX_PARTS = 10_000
#: Smallest part S3 accepts (except the last).
MIN_PART_SIZE = 5 * 1024 * 1024
#: CopyObject's limit; larger objects need a multipart copy.
MAX_COPY_SIZE = 5 * (1 << 30)


#: Receives body bytes with their absolute offset in the object.
Sink = Callable[[int, memoryview], None]


@dataclass(frozen=True)
class FileSink:
    """A `Sink` whose bytes go into file *fd* at their offsets in the object. Called like a
    sink, it hands each piece to *write* (which puts it there). A store that can move a body
    from the socket into the file without user space (splice(2)) does that instead and then
    calls *landed*(n) for each piece in place. Only for bytes nobody needs in memory (a
    CRC computed on the way needs a plain sink)."""

    fd: int
    write: Sink
    landed: Callable[[int], None]

    def __call__(self, offset: int, data: memoryview) -> None:
        self.write(offset, data)


#: Read size for streamed bodies: large enough to keep syscalls rare, small enough to stay in
#: L2 (1 MiB Python buffers measured 3-4x slower than 64-256 KiB on this kind of machine).
STREAM_BUFSIZE = 256 * 1024


class NoCredentialsError(Exception):
    """No credentials anywhere in the standard chain (environment, shared files and profiles,
    container credentials, the instance metadata service)."""

    def __init__(self) -> None:
        super().__init__(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "use --profile with ~/.aws/credentials, or run with an instance or task role"
        )


#: Full-object checksums the engine can compute in parallel (per chunk, then combined), in
#: order of preference; x-amz-checksum-ALGORITHM response headers. SHA-1/SHA-256 are
#: sequential like MD5 and slower: not used.
CRC_ALGORITHMS = ("crc64nvme", "crc32c", "crc32")

#: Request header that makes S3 return the stored x-amz-checksum-* headers (HEAD, whole GET).
CHECKSUM_MODE = ("x-amz-checksum-mode", "ENABLED")


@dataclass(frozen=True)
class Checksum:
    """A checksum the store keeps for a whole object (`x-amz-checksum-*`)."""

    #: One of CRC_ALGORITHMS.
    algorithm: str
    #: Base64 of the big-endian CRC as the store returned it; a composite multipart checksum
    #: (a CRC of the part CRCs) ends with "-N", N the number of parts.
    value: str
    #: "FULL_OBJECT", "COMPOSITE", or "" when the store did not say (moto, older S3 answers).
    type: str = ""


@dataclass(frozen=True)
class ObjectInfo:
    """What the engine knows of an object. `last_modified` is in seconds (what the engine
    compares with st_mtime); `last_modified_ns` gives nanoseconds like the FUSE side."""

    key: str
    size: int
    etag: str = ""
    last_modified: float = 0.0
    #: User metadata with lower-cased keys (servers differ in the case they return).
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: The stored full-object CRC, when the store returned one (HEAD or whole GET asked with
    #: CHECKSUM_MODE); never set from a ranged GET.
    checksum: Checksum | None = None

    @property
    def last_modified_ns(self) -> int:
        return int(self.last_modified * 1_000_000_000)


def checksum_from_headers(headers: Mapping[str, str]) -> Checksum | None:
    """The preferred CRC among lower-cased response headers, or None."""
    for alg in CRC_ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{alg}", "").strip()
        if value:
            return Checksum(alg, value, headers.get("x-amz-checksum-type", "").strip().upper())
    return None


def checksum_from_boto3(response: Mapping[str, object]) -> Checksum | None:
    """The preferred CRC of a boto3 head_object / get_object response, or None."""
    for alg in CRC_ALGORITHMS:
        value = response.get(f"Checksum{alg.upper()}")
        if isinstance(value, str) and value.strip():
            kind = response.get("ChecksumType")
            return Checksum(alg, value.strip(), kind.upper() if isinstance(kind, str) else "")
    return None


@dataclass(frozen=True)
class PartInfo:
    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    initiated: float


class ObjectStore(Protocol):
    """What the engine asks of an S3 endpoint. Implementations must be thread-safe."""

    endpoint: str

    def head(self, bucket: str, key: str) -> ObjectInfo | None: ...

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]: ...

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        """Stream [start, start+length) (or to the end) into *sink*; returns what GET said."""
        ...

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        """Several whole small objects at once where the store can (pipelined); None for
        each one the caller must `get` itself. Never raises for a single object."""
        ...

    def put(self, bucket: str, key: str, data: bytes, metadata: Mapping[str, str]) -> str: ...

    def close(self) -> None:
        """Release connections; called by whoever made the store, once no copy uses it."""
        ...

    def create_multipart(self, bucket: str, key: str, metadata: Mapping[str, str]) -> str: ...

    def list_uploads(self, bucket: str, key: str) -> list[UploadInfo]: ...

    def list_parts(self, bucket: str, key: str, upload_id: str) -> dict[int, PartInfo]: ...

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes, md5: bytes | None
    ) -> str:
        """Upload one part; *md5* (its digest), if given, goes as Content-MD5 for the server
        to check."""
        ...

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str: ...

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None: ...

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        """Delete up to 1,000 objects; raises if the request or any one key failed."""
        ...

    def is_transient(self, exc: BaseException) -> bool:
        """True if the same request may succeed later."""
        ...

    def is_unreachable(self, exc: BaseException) -> bool:
        """True if the endpoint itself cannot be reached (no point trying other files)."""
        ...
