"""Verification of copied bytes: ETag / MD5 helpers, multipart geometry, and the store's CRCs
computed per chunk (`CrcCheck`, `ChunkCrc`) and combined at the end, so a verified download
costs no sequential pass. The in-order MD5 of large files is `hasher.Hasher`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable

from plugin.s3.store import MAX_PARTS, MIN_PART_SIZE, STREAM_BUFSIZE, Checksum, ObjectInfo
from plugin.staging import crc
from plugin.staging.errors import VerificationError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: S3 refuses multipart parts below 5 MiB (except the last) and uploads above 10,000 parts.
MD5_RE = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


def part_size_for(size: int, chunk_size: int) -> int:
    """Multipart part size: the chunk size, at least 5 MiB, grown to stay within 10,000 parts."""
    part = max(chunk_size, MIN_PART_SIZE)
    while (size + part - 1) // part > MAX_PARTS:
        part *= 2
    return part


def guess_part_size(info: ObjectInfo, nparts: int, chunk_size: int) -> int | None:
    """The part size a multipart ETag was built with: from our metadata, else a guess."""
    hint = info.metadata.get("stowage-partsize", "")
    candidates = [int(hint)] if hint.isdigit() else []
    candidates += [part_size_for(info.size, chunk_size)]
    candidates += [m * MiB for m in (8, 16, 5, 10, 15, 32, 50, 64, 100, 128)]
    for c in candidates:
        if c > 0 and (info.size + c - 1) // c == nparts:
            return c
    return None


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    digests = list(part_md5s)
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def clean_etag(etag: str) -> str:
    return etag.strip().strip('"').lower()


def plain_md5(etag: str) -> str | None:
    """The cleaned ETag if it is a plain MD5 of the body (not multipart, not opaque)."""
    clean = clean_etag(etag)
    return clean if MD5_RE.match(clean) and "-" not in clean else None


def md5_fd(fd: int) -> str:
    """MD5 of an open file; the descriptor is closed."""
    h = hashlib.md5()
    with open(fd, "rb") as fh:
        while block := fh.read(STREAM_BUFSIZE):
            h.update(block)
    return h.hexdigest()


def usable_crc(info: ObjectInfo) -> tuple[Checksum, int | None] | None:
    """(checksum, None) for a full-object CRC, (checksum, number of parts) for a composite
    one, or None when there is none we can compute or it is ambiguous: a multipart object's
    CRC32/CRC32C whose type the store does not give (moto says nothing for its composite
    ones) is not trusted; CRC64NVME is full-object by definition."""
    cs = info.checksum
    if cs is None or not crc.supported(cs.algorithm):
        return None
    _, dash, suffix = cs.value.partition("-")
    etag = clean_etag(info.etag)
    multipart = bool(MD5_RE.match(etag)) and "-" in etag
    if dash or cs.type == "COMPOSITE":
        if suffix.isdigit():
            return cs, int(suffix)
        if multipart:
            return cs, int(etag.split("-")[1])
        return None
    if cs.type == "FULL_OBJECT" or cs.algorithm == "crc64nvme":
        return cs, None
    if multipart or "-" in etag:
        return None
    return cs, None


def crc_value(cs: Checksum) -> str:
    """The base64 CRC without a composite "-N" suffix."""
    return cs.value.partition("-")[0]


def verify_whole(info: ObjectInfo, buf: bytes | bytearray) -> str:
    """Check a whole object's body against the CRC its GET returned, else its MD5 ETag;
    returns the check made."""
    usable = usable_crc(info)
    if usable is not None and usable[1] is None:
        cs = usable[0]
        fn = crc.compute_fn(cs.algorithm)
        assert fn is not None
        got = crc.encode(cs.algorithm, fn(buf, 0))
        if got != crc_value(cs):
            raise VerificationError(
                f"{cs.algorithm} {got} does not match the store's {cs.value}; not renamed"
            )
        return cs.algorithm
    etag = plain_md5(info.etag)
    if etag is None:
        return "size-only"
    got = hashlib.md5(buf).hexdigest()
    if got != etag:
        raise VerificationError(f"MD5 {got} does not match ETag {etag}; not renamed")
    return "md5"


def crc_check_for(key: str, info: ObjectInfo, chunk: int) -> CrcCheck | None:
    """The CRC verification of a chunked download, when the store keeps a CRC we can
    rebuild from per-chunk CRCs: a full-object one, or a composite one (CRC of the part
    CRCs) whose part size is known."""
    usable = usable_crc(info)
    if usable is None:
        if info.checksum is not None:
            log.info(
                "%s: the store's %s (type %s) is not usable here; checking the ETag",
                key,
                info.checksum.algorithm,
                info.checksum.type or "not given",
            )
        return None
    cs, nparts = usable
    part_size = None
    if nparts is not None:
        part_size = guess_part_size(info, nparts, chunk)
        if part_size is None:
            log.info("%s: part size of the composite %s unknown", key, cs.algorithm)
            return None
    return CrcCheck(cs, info.size, chunk, part_size)


class ChunkCrc:
    """CRCs of one chunk's segments, fed with the chunk's bytes in order as they arrive."""

    def __init__(self, fn: crc.CrcFn, segments: list[tuple[int, int]]) -> None:
        self._fn = fn
        self.segments = segments
        self.values = [0] * len(segments)
        self._pos = segments[0][0]
        self._i = 0
        self._broken = False

    def update(self, offset: int, data: memoryview) -> None:
        if offset != self._pos or self._broken:
            self._broken = True  # not in order: the caller reads the chunk back instead
            return
        while len(data):
            if self._i >= len(self.segments):
                self._broken = True
                return
            end = self.segments[self._i][1]
            if self._pos >= end:
                self._i += 1
                continue
            k = min(len(data), end - self._pos)
            self.values[self._i] = self._fn(data[:k], self.values[self._i])
            data = data[k:]
            self._pos += k

    def complete(self) -> bool:
        return not self._broken and self._pos == self.segments[-1][1]


class CrcCheck:
    """The store's CRC of a file filled chunk by chunk in any order: each chunk's CRC is
    computed by the worker that writes it (on the received buffer), and `result` combines them
    in order with arithmetic on the CRCs alone, so verification adds no sequential pass.

    A full-object CRC combines every chunk. A composite one (CRC of the part CRCs, what S3
    keeps for a multipart upload with CRC32/CRC32C by default) needs the part CRCs: chunks are
    cut at part boundaries into segments, the segments of each part combined, then the CRC of
    the concatenated big-endian part CRCs taken, with "-N" appended.
    """

    def __init__(self, cs: Checksum, size: int, chunk: int, part_size: int | None) -> None:
        fn = crc.compute_fn(cs.algorithm)
        assert fn is not None
        self.algorithm = cs.algorithm
        self._fn = fn
        self._size = size
        self._chunk = chunk
        self._part_size = part_size
        self._nchunks = max(1, (size + chunk - 1) // chunk)
        self._crcs: list[list[int] | None] = [None] * self._nchunks
        self._lock = threading.Lock()
        self.want = crc_value(cs)
        if part_size is not None:
            self.want += f"-{max(1, (size + part_size - 1) // part_size)}"

    def segments(self, index: int) -> list[tuple[int, int]]:
        start = index * self._chunk
        end = min(start + self._chunk, self._size)
        if self._part_size is None:
            return [(start, end)]
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            cut = min(end, (pos // self._part_size + 1) * self._part_size)
            out.append((pos, cut))
            pos = cut
        return out or [(start, end)]

    def feeder(self, index: int) -> ChunkCrc:
        return ChunkCrc(self._fn, self.segments(index))

    def store(self, index: int, values: list[int]) -> None:
        with self._lock:
            self._crcs[index] = list(values)

    def from_file(self, index: int, fd: int) -> None:
        """The chunk's CRCs from the part file (pread into a reused buffer; a short read
        leaves them unknown, which fails the check)."""
        feed = self.feeder(index)
        buf = bytearray(min(1 << 20, self._chunk))
        view = memoryview(buf)
        for start, end in feed.segments:
            pos = start
            while pos < end:
                n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
                if n <= 0:
                    log.warning("part file shrank while being verified (at byte %d)", pos)
                    return
                feed.update(pos, view[:n])
                pos += n
        if feed.complete():
            self.store(index, feed.values)

    def result(self) -> str | None:
        """The CRC in the store's form, or None if a chunk's CRC is missing."""
        with self._lock:
            if any(v is None for v in self._crcs):
                return None
            pieces = [
                (crc_value, end - start)
                for i, values in enumerate(self._crcs)
                if values is not None
                for (start, end), crc_value in zip(self.segments(i), values, strict=True)
            ]
        alg = self.algorithm
        if self._part_size is None:
            total, _ = pieces[0]
            for value, length in pieces[1:]:
                total = crc.combine(alg, total, value, length)
            return crc.encode(alg, total)
        # Composite: combine the segments of each part, then the CRC of the part CRCs.
        parts: list[int] = []
        pos = 0
        for value, length in pieces:
            if pos % self._part_size == 0:
                parts.append(value)
            else:
                parts[-1] = crc.combine(alg, parts[-1], value, length)
            pos += length
        width = crc.width_bytes(alg)
        joined = b"".join(p.to_bytes(width, "big") for p in parts)
        return f"{crc.encode(alg, self._fn(joined, 0))}-{len(parts)}"
