"""The engine's side of the host object cache (`CopyOptions.object_cache`): a hit fills the
file with no GET, a verified download is admitted, an unverified one or one without an ETag
never is, and a download that fails verification is not admitted either."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from plugin.s3.store import ObjectInfo, Sink
from plugin.staging import CopyOptions, copy
from plugin.staging.locations import LocalLocation, S3Location
from plugin.staging.objcache import ObjectIdentity
from plugin.staging.progress import CopyResult

CHUNK = 64 * 1024
SMALL = b"small object\n" * 10
LARGE = os.urandom(3 * CHUNK + 17)  # chunked download


class CountingBucket:
    """An in-memory ObjectStore for downloads that counts requests by kind."""

    endpoint = "http://store.test:9000"

    def __init__(self, objects: Mapping[str, bytes], etags: bool = True) -> None:
        self.objects = dict(objects)
        self.etags = etags
        self.corrupt = False
        self.requests: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def gets(self) -> int:
        return self.requests.get("GET", 0) + self.requests.get("GET_MANY", 0)

    def _info(self, key: str) -> ObjectInfo:
        body = self.objects[key]
        etag = f'"{hashlib.md5(body).hexdigest()}"' if self.etags else ""
        return ObjectInfo(key, len(body), etag, 1.6e9, {"mode": "33188", "mtime": "1600000000"})

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        self._count("HEAD")
        return self._info(key) if key in self.objects else None

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        self._count("LIST")
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield self._info(key)

    def get(
        self, bucket: str, key: str, sink: Sink, start: int = 0, length: int | None = None
    ) -> ObjectInfo:
        self._count("GET")
        body = self.objects[key]
        if self.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        end = len(body) if length is None else start + length
        sink(start, memoryview(body[start:end]))
        return self._info(key)

    def get_many(
        self, bucket: str, keys: list[str], max_size: int
    ) -> list[tuple[ObjectInfo, bytes] | None]:
        self._count("GET_MANY")
        return [None] * len(keys)

    def close(self) -> None:
        pass

    def is_transient(self, exc: BaseException) -> bool:
        return False

    def is_unreachable(self, exc: BaseException) -> bool:
        return False


class FakeCache:
    """Keeps admitted bytes in memory; fills by plain writes."""

    def __init__(self) -> None:
        self.entries: dict[ObjectIdentity, bytes] = {}
        self.fills: list[ObjectIdentity] = []
        self._lock = threading.Lock()

    def fill(self, ident: ObjectIdentity, dst_fd: int) -> bool:
        assert os.fstat(dst_fd).st_size == 0, "fill must get an empty part file"
        with self._lock:
            self.fills.append(ident)
            body = self.entries.get(ident)
        if body is None:
            return False
        view = memoryview(body)
        while view:
            view = view[os.write(dst_fd, view) :]
        return True

    def admit(self, ident: ObjectIdentity, src_fd: int) -> None:
        body = os.pread(src_fd, ident.size + 1, 0)
        with self._lock:
            self.entries[ident] = body


def _ident(key: str, body: bytes) -> ObjectIdentity:
    return ObjectIdentity(
        CountingBucket.endpoint, "b", key, hashlib.md5(body).hexdigest(), len(body)
    )


def _download(store: CountingBucket, dst: Path, **kw: object) -> CopyResult:
    opts = CopyOptions(**{"chunk_size": CHUNK, "jobs": 2, "retries": 0, **kw})  # type: ignore[arg-type]
    return copy(S3Location("b", "p/"), LocalLocation(str(dst), True), opts, store=store)  # type: ignore[arg-type]


def _objects() -> dict[str, bytes]:
    return {"p/small.txt": SMALL, "p/dir/large.bin": LARGE}


def test_a_verified_download_is_admitted(tmp_path: Path) -> None:
    store, cache = CountingBucket(_objects()), FakeCache()
    result = _download(store, tmp_path / "dst", object_cache=cache)
    assert result.ok, result.errors
    assert cache.entries == {
        _ident("p/small.txt", SMALL): SMALL,
        _ident("p/dir/large.bin", LARGE): LARGE,
    }
    assert result.files_from_cache == 0


def test_a_hit_fills_the_file_without_a_get(tmp_path: Path) -> None:
    cache = FakeCache()
    first = CountingBucket(_objects())
    assert _download(first, tmp_path / "one", object_cache=cache).ok
    assert first.gets() > 0
    store = CountingBucket(_objects())
    dst = tmp_path / "two"
    result = _download(store, dst, object_cache=cache)
    assert result.ok, result.errors
    assert store.gets() == 0, store.requests
    assert (dst / "small.txt").read_bytes() == SMALL
    assert (dst / "dir" / "large.bin").read_bytes() == LARGE
    assert (dst / "small.txt").stat().st_mtime == 1_600_000_000  # metadata applied
    assert result.files_copied == 2 and result.files_from_cache == 2
    assert result.bytes_from_cache == len(SMALL) + len(LARGE)
    assert result.checks == {"cache": 2}
    assert sorted(os.listdir(dst)) == ["dir", "small.txt"]  # no part file left


def test_unverified_downloads_are_not_admitted(tmp_path: Path) -> None:
    store, cache = CountingBucket(_objects()), FakeCache()
    result = _download(store, tmp_path / "dst", object_cache=cache, verify=False)
    assert result.ok, result.errors
    assert cache.entries == {}
    assert (tmp_path / "dst" / "dir" / "large.bin").read_bytes() == LARGE
    # The same download verified is admitted.
    assert _download(store, tmp_path / "again", object_cache=cache).ok
    assert len(cache.entries) == 2


def test_objects_without_an_etag_bypass_the_cache(tmp_path: Path) -> None:
    store, cache = CountingBucket(_objects(), etags=False), FakeCache()
    result = _download(store, tmp_path / "dst", object_cache=cache)
    assert result.ok, result.errors
    assert cache.entries == {} and cache.fills == []
    store.etags = True  # the same objects with ETags: asked for, then admitted
    assert _download(store, tmp_path / "again", object_cache=cache).ok
    assert len(cache.fills) == 2 and len(cache.entries) == 2


def test_a_download_failing_verification_is_not_admitted(tmp_path: Path) -> None:
    store, cache = CountingBucket(_objects()), FakeCache()
    store.corrupt = True
    result = _download(store, tmp_path / "dst", object_cache=cache)
    assert result.files_failed == 2
    assert cache.entries == {}
    store.corrupt = False
    assert _download(store, tmp_path / "dst", object_cache=cache).ok
    assert len(cache.entries) == 2


class BrokenCache(FakeCache):
    def fill(self, ident: ObjectIdentity, dst_fd: int) -> bool:
        os.write(dst_fd, b"half")
        raise OSError(5, "cache disk gone")


def test_a_broken_cache_costs_a_download_not_the_file(tmp_path: Path) -> None:
    store, cache = CountingBucket(_objects()), BrokenCache()
    dst = tmp_path / "dst"
    result = _download(store, dst, object_cache=cache)
    assert result.ok, result.errors
    assert (dst / "small.txt").read_bytes() == SMALL
    assert (dst / "dir" / "large.bin").read_bytes() == LARGE
    assert result.files_from_cache == 0 and store.gets() > 0
