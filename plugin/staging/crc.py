"""CRC checksums S3 stores keep for whole objects (CRC64NVME, CRC32C, CRC32), computed per
chunk on any thread and combined in order afterwards: a verified download costs no sequential
pass (MD5, the ETag's hash, is one pass at ~1.4-1.6 s of one core per GiB here; CRC64NVME and
CRC32C in awscrt about 0.05 s per GiB, CRC32 0.4 s).

`combine(alg, crc1, crc2, len2)` is CRC(A || B) from CRC(A), CRC(B) and len(B). awscrt >= 0.25
has it for every algorithm; otherwise the standard GF(2) polynomial arithmetic of zlib's
crc32_combine (generalised to any reflected CRC) does it here, a few microseconds per call.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable
from typing import Any

#: (width in bits, reflected polynomial) of each algorithm; all are reflected, with init and
#: final xor all ones, so combine(a, b, n) = a * x^(8n) mod P xor b.
_POLY = {
    "crc32": (32, 0xEDB88320),
    "crc32c": (32, 0x82F63B78),
    "crc64nvme": (64, 0x9A6C9329AC4BC9B5),
}

_checksums: Any = None
try:
    import awscrt.checksums  # type: ignore[import-untyped]

    _checksums = awscrt.checksums
except ImportError:  # pragma: no cover - awscrt is a dependency of the fast store
    pass

CrcFn = Callable[[Any, int], int]


def compute_fn(algorithm: str) -> CrcFn | None:
    """fn(buffer, previous_crc) -> crc for *algorithm*, or None if nothing here computes it.
    awscrt's release the GIL (measured: two threads run in parallel)."""
    if _checksums is not None:
        fn = getattr(_checksums, algorithm, None)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    if algorithm == "crc32":
        return lambda data, prev: zlib.crc32(data, prev)
    return None


def supported(algorithm: str) -> bool:
    return algorithm in _POLY and compute_fn(algorithm) is not None


def width_bytes(algorithm: str) -> int:
    return _POLY[algorithm][0] // 8


def encode(algorithm: str, crc: int) -> str:
    """The form S3 returns: base64 of the big-endian CRC."""
    return base64.b64encode(crc.to_bytes(width_bytes(algorithm), "big")).decode()


def _multmodp(a: int, b: int, poly: int, top: int) -> int:
    """a * b modulo the polynomial, in reflected bit order (zlib's multmodp)."""
    m = top
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


_X2N: dict[str, list[int]] = {}


def _x2n_table(algorithm: str) -> list[int]:
    """x^(2^k) mod P for k < width (the powers cycle with that period at most)."""
    table = _X2N.get(algorithm)
    if table is None:
        width, poly = _POLY[algorithm]
        top = 1 << (width - 1)
        p = top >> 1  # x^1
        table = [p]
        for _ in range(1, width):
            p = _multmodp(p, p, poly, top)
            table.append(p)
        _X2N[algorithm] = table
    return table


def combine_py(algorithm: str, crc1: int, crc2: int, len2: int) -> int:
    """CRC(A || B) from CRC(A), CRC(B), len(B), by polynomial arithmetic (no data)."""
    width, poly = _POLY[algorithm]
    top = 1 << (width - 1)
    table = _x2n_table(algorithm)
    # x^(8 * len2) mod P: multiply x^(2^k) for each set bit of len2, starting at k = 3.
    p = top  # x^0
    n, k = len2, 3
    while n:
        if n & 1:
            p = _multmodp(table[k % width], p, poly, top)
        n >>= 1
        k += 1
    return _multmodp(p, crc1, poly, top) ^ crc2


def combine(algorithm: str, crc1: int, crc2: int, len2: int) -> int:
    if _checksums is not None:
        fn = getattr(_checksums, f"combine_{algorithm}", None)
        if fn is not None:
            return int(fn(crc1, crc2, len2))
    return combine_py(algorithm, crc1, crc2, len2)
