"""One s3fs metadata codec (issue 13): the FUSE filesystem's write path and stage-out (the copy
engine writing to S3) store the same `x-amz-meta-*` for the same file, in the format s3fs-fuse
itself writes ("sec", or "sec.nnnnnnnnn" when there are nanoseconds); every reader accepts what
any writer, old stowage included, stored; and the sanitiser of outside metadata never grants
privilege, whatever the bucket holds."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pyfuse3 = pytest.importorskip("pyfuse3")
trio = pytest.importorskip("trio")

from plugin.fusefs.inodes import Attrs, Defaults, attrs_from_metadata, metadata_for  # noqa: E402
from plugin.fusefs.store import ObjectStore, UploadConfig  # noqa: E402
from plugin.s3 import metadata  # noqa: E402
from plugin.s3.boto3store import Boto3Store  # noqa: E402
from plugin.staging.engine import CopyOptions, copy  # noqa: E402

CODEC_KEYS = ("mode", "uid", "gid", "mtime")
NS = 1_000_000_000


class RecordingClient:
    """Just enough of a boto3 S3 client for one small upload: keeps what was PUT."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}

    # boto3's keyword names (Bucket, Key, Body, Metadata) arrive in **call.
    def put_object(self, **call: Any) -> dict[str, Any]:
        body = bytes(call["Body"])
        self.objects[call["Key"]] = (body, dict(call["Metadata"]))
        return {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}

    def head_object(self, **call: Any) -> dict[str, Any]:
        import botocore.exceptions

        if call["Key"] not in self.objects:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "404"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                "HeadObject",
            )
        body, meta = self.objects[call["Key"]]
        return {
            "ContentLength": len(body),
            "ETag": f'"{hashlib.md5(body).hexdigest()}"',
            "Metadata": meta,
        }

    def get_paginator(self, name: str) -> Any:
        client = self

        class _Pages:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                prefix = kwargs.get("Prefix", "")
                contents = [
                    {"Key": k, "Size": len(b), "ETag": f'"{hashlib.md5(b).hexdigest()}"'}
                    for k, (b, _) in client.objects.items()
                    if k.startswith(prefix)
                ]
                yield {"Contents": contents} if name == "list_objects_v2" else {}

        return _Pages()

    def list_multipart_uploads(self, **_: Any) -> dict[str, Any]:
        return {"Uploads": []}


def fuse_write(attrs: Attrs, data: bytes, cache_dir: Path) -> dict[str, str]:
    """The metadata the FUSE filesystem stores when it uploads a file with *attrs*."""
    client = RecordingClient()
    store = ObjectStore(client, "bucket")
    path = cache_dir / "fuse.data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:

        async def upload() -> None:
            await store.upload_file(
                "vol/file", fd, len(data), metadata_for(attrs), None, UploadConfig()
            )

        trio.run(upload)
    finally:
        os.close(fd)
    return client.objects["vol/file"][1]


def stage_out(
    mode: int, uid: int, gid: int, mtime_ns: int, data: bytes, root: Path
) -> dict[str, str]:
    """The metadata stage-out (the copy engine, local to S3) stores for the same file."""
    src = root / "src"
    src.mkdir()
    f = src / "file"
    f.write_bytes(data)
    os.chmod(f, stat.S_IMODE(mode))
    os.chown(f, uid, gid)
    os.utime(f, ns=(mtime_ns, mtime_ns))
    client = RecordingClient()
    result = copy(
        str(src),
        "s3://bucket/vol",
        CopyOptions(preserve_owner=True, jobs=1),
        store=Boto3Store(client=client),
    )
    assert result.ok and result.files_copied == 1, result
    return client.objects["vol/file"][1]


def codec_view(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k in CODEC_KEYS}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="stage-out keeps owners as root")


@needs_root
@pytest.mark.parametrize("mtime_ns", [1_700_000_000 * NS, 1_700_000_000 * NS + 123_456_789])
def test_fuse_and_stage_out_store_identical_metadata(tmp_path: Path, mtime_ns: int) -> None:
    mode = stat.S_IFREG | 0o640
    data = b"same file, two writers\n"
    attrs = Attrs(mode=mode, uid=1234, gid=5678, size=len(data), mtime_ns=mtime_ns)
    from_fuse = fuse_write(attrs, data, tmp_path)
    from_engine = stage_out(mode, 1234, 5678, mtime_ns, data, tmp_path)
    assert codec_view(from_fuse) == codec_view(from_engine)
    assert set(codec_view(from_fuse)) == set(CODEC_KEYS)
    # What s3fs-fuse writes: no fraction for whole seconds, nine digits otherwise.
    sec, nsec = divmod(mtime_ns, NS)
    assert from_fuse["mtime"] == (str(sec) if nsec == 0 else f"{sec}.{nsec:09d}")


@needs_root
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    perms=st.integers(0, 0o777),
    uid=st.integers(0, 2**31),
    gid=st.integers(0, 2**31),
    mtime_ns=st.one_of(
        st.integers(0, 4_000_000_000).map(lambda s: s * NS), st.integers(0, 4_000_000_000 * NS)
    ),
)
def test_both_writers_agree_for_any_file(perms: int, uid: int, gid: int, mtime_ns: int) -> None:
    mode = stat.S_IFREG | perms
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        attrs = Attrs(mode=mode, uid=uid, gid=gid, size=1, mtime_ns=mtime_ns)
        assert codec_view(fuse_write(attrs, b"x", root)) == codec_view(
            stage_out(mode, uid, gid, mtime_ns, b"x", root)
        )


mtimes = st.integers(-metadata.MAX_MTIME_NS, metadata.MAX_MTIME_NS)


@given(
    mode=st.integers(0, 0o177777),
    uid=st.integers(0, metadata.MAX_ID),
    gid=st.integers(0, metadata.MAX_ID),
    mtime_ns=mtimes,
)
def test_encode_then_decode_round_trips(mode: int, uid: int, gid: int, mtime_ns: int) -> None:
    mode = stat.S_IFREG | stat.S_IMODE(mode)
    encoded = metadata.encode(mode, uid, gid, mtime_ns)
    got = metadata.decode(
        encoded, default_mode=stat.S_IFREG, default_uid=0, default_gid=0, last_modified_ns=0
    )
    assert (got.mode, got.uid, got.gid, got.mtime_ns) == (mode, uid, gid, mtime_ns)
    # The FUSE table's own wrappers agree.
    attrs = Attrs(mode=mode, uid=uid, gid=gid, size=0, mtime_ns=mtime_ns)
    back = attrs_from_metadata(
        metadata_for(attrs),
        size=0,
        last_modified_ns=0,
        default_mode=stat.S_IFREG,
        defaults=Defaults(),
    )
    assert back == attrs


@given(
    perms=st.integers(0, 0o777),
    uid=st.integers(0, metadata.MAX_ID),
    gid=st.integers(0, metadata.MAX_ID),
    mtime_ns=st.integers(0, metadata.MAX_MTIME_NS),
)
def test_sanitize_reads_what_encode_wrote(perms: int, uid: int, gid: int, mtime_ns: int) -> None:
    safe = metadata.sanitize(metadata.encode(stat.S_IFREG | perms, uid, gid, mtime_ns))
    assert (safe.mode, safe.uid, safe.gid, safe.mtime_ns) == (
        stat.S_IFREG | perms,
        uid,
        gid,
        mtime_ns,
    )
    assert safe.rejected == ()


@given(sec=st.integers(0, 2**33), nsec=st.integers(0, NS - 1))
def test_every_mtime_spelling_decodes_the_same(sec: int, nsec: int) -> None:
    ns = sec * NS + nsec
    spellings = [f"{sec}.{nsec:09d}", f" {sec}.{nsec:09d} "]
    if nsec == 0:
        spellings += [str(sec), f"{sec}.0"]
    for text in spellings:
        assert metadata.parse_mtime(text) == ns
    # Canonical writing: the legacy "sec.000000000" becomes s3fs's "sec".
    assert metadata.canonical({"mtime": f"{sec}.{nsec:09d}"})["mtime"] == metadata.format_mtime(ns)


outside = st.dictionaries(
    st.sampled_from(["mode", "Mode", "uid", "UID", "gid", "mtime", "MTime", "other"]),
    st.one_of(
        st.text(max_size=30),
        st.integers(-(2**70), 2**70).map(str),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
    ),
    max_size=8,
)


@given(outside)
def test_sanitize_never_grants_privilege(meta: dict[str, str]) -> None:
    safe = metadata.sanitize(meta)
    assert stat.S_IFMT(safe.mode) in (stat.S_IFREG, stat.S_IFLNK)
    assert safe.mode & 0o7000 == 0
    assert -1 <= safe.uid <= metadata.MAX_ID and -1 <= safe.gid <= metadata.MAX_ID
    assert (safe.uid < 0) == (safe.gid < 0)
    assert safe.mtime_ns is None or 0 <= safe.mtime_ns <= metadata.MAX_MTIME_NS


@given(outside)
def test_decode_never_fails_on_outside_metadata(meta: dict[str, str]) -> None:
    got = metadata.decode(
        meta, default_mode=stat.S_IFDIR | 0o755, default_uid=1, default_gid=2, last_modified_ns=7
    )
    assert stat.S_ISDIR(got.mode)  # a directory's key keeps it a directory
    assert -metadata.MAX_MTIME_NS <= got.mtime_ns <= metadata.MAX_MTIME_NS
