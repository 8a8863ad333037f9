"""What the copy engine asks of a host-wide cache of downloaded objects (``--stage-cache``).

The engine owns downloading and verifying; the cache owns where verified copies live and how
they are cloned into a volume. The engine only ever admits bytes it has verified against the
store's checksum, and a cache fills a destination only from entries admitted that way, so a
cache never serves bytes nobody checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjectIdentity:
    """One version of one object: a changed object has another ETag and so another entry."""

    endpoint: str  #: the S3 endpoint URL, or "" for the SDK default (AWS)
    bucket: str
    key: str
    etag: str  #: as the store returned it, quotes stripped
    size: int


class ObjectCache(Protocol):
    def fill(self, ident: ObjectIdentity, dst_fd: int) -> bool:
        """Write the cached bytes of *ident* into *dst_fd* (an empty regular file open for
        writing) by reflink or copy_file_range; False on a miss, with *dst_fd* left empty."""

    def admit(self, ident: ObjectIdentity, src_fd: int) -> None:
        """Keep a copy of *src_fd*'s verified bytes (read from offset 0) for later fills.

        Never raises for a full or broken cache: the copy it was asked to speed up succeeded.
        """
