"""The engine's mirror step (`CopyOptions.delete_extraneous`, `stowage cp --delete`): after a
complete, failure-free copy the destination holds exactly what the source holds, apart from the
engine's own `.stowage.*` files; after any failure nothing is deleted; a link planted in the
destination is deleted, never followed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from stagingkit import S3Server

from plugin.s3.boto3store import Boto3Store
from plugin.s3.settings import S3Settings
from plugin.staging import CopyOptions, S3Options, copy
from plugin.staging.cli import main as cp_main

CHUNK = 64 * 1024


def _opts(**kw: Any) -> CopyOptions:
    base: dict[str, Any] = {"chunk_size": CHUNK, "jobs": 2, "retries": 0, "retry_delay": 0.01}
    base.update(kw)
    return CopyOptions(**base)


def _tree(root: Path) -> list[str]:
    """Every name beneath *root*, links not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _source(root: Path) -> None:
    (root / "keep" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "keep" / "b.txt").write_text("b\n")
    (root / "keep" / "big.bin").write_bytes(os.urandom(3 * CHUNK + 5))  # chunked path
    (root / "keep" / "deeper" / "c.txt").write_text("c\n")
    (root / "empty").mkdir()


def _keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# -- local destination ---------------------------------------------------------------------------


def test_local_destination_loses_what_the_source_lacks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    assert copy(f"{src}/", f"{dst}/", _opts()).ok
    # What the other host removed: a file, a directory tree, a link; a directory became a file.
    (dst / "gone.txt").write_text("removed on the other host\n")
    (dst / "keep" / "gone-dir" / "inner").mkdir(parents=True)
    (dst / "keep" / "gone-dir" / "inner" / "x").write_text("x")
    os.symlink("a.txt", dst / "gone-link")
    result = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert result.ok, result.errors
    assert _tree(dst) == _tree(src)
    # gone.txt, gone-link, and gone-dir with its two entries.
    assert result.deleted == 5
    assert "deleted" in result.summary()


def test_local_mirror_is_off_by_default(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    dst.mkdir()
    (dst / "extra.txt").write_text("kept\n")
    result = copy(f"{src}/", f"{dst}/", _opts())
    assert result.ok and result.deleted == 0
    assert (dst / "extra.txt").exists()
    assert copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True)).deleted == 1
    assert not (dst / "extra.txt").exists()


def test_nothing_deleted_after_a_failed_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    dst.mkdir()
    (dst / "extra.txt").write_text("must stay: the copy failed\n")
    # The source's file a.txt meets a non-empty directory of that name: that file fails.
    (dst / "a.txt").mkdir()
    (dst / "a.txt" / "inside").write_text("x")
    result = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert not result.ok and result.files_failed == 1
    assert result.deleted == 0
    assert (dst / "extra.txt").exists()
    assert (dst / "a.txt" / "inside").exists()
    # Once nothing fails, the same copy deletes.
    (dst / "a.txt" / "inside").unlink()
    (dst / "a.txt").rmdir()
    again = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert again.ok and again.deleted == 1 and not (dst / "extra.txt").exists()


def test_nothing_deleted_when_the_source_listing_is_partial(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    os.mkfifo(src / "pipe")  # reported and not copied: the listing is not the whole source
    dst.mkdir()
    (dst / "extra.txt").write_text("must stay\n")
    result = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert not result.ok and result.deleted == 0
    assert (dst / "extra.txt").exists()
    (src / "pipe").unlink()
    again = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert again.ok and again.deleted == 1 and not (dst / "extra.txt").exists()


def test_engine_temp_files_are_kept(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    dst.mkdir()
    (dst / "keep").mkdir()
    ours = [".stowage.x.part", ".stowage.x.journal", "keep/.stowage.gone-elsewhere.part"]
    for rel in ours:
        (dst / rel).write_bytes(b"resume me")
    (dst / "extra").write_text("goes\n")
    result = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert result.ok, result.errors
    assert result.deleted == 1 and not (dst / "extra").exists()
    for rel in ours:
        assert (dst / rel).read_bytes() == b"resume me", rel


def test_planted_link_is_removed_not_followed(tmp_path: Path) -> None:
    src, dst, host = tmp_path / "src", tmp_path / "dst", tmp_path / "host"
    _source(src)
    host.mkdir()
    (host / "secret").write_text("host data\n")
    (host / "sub").mkdir()
    (host / "sub" / "more").write_text("more host data\n")
    before = _tree(host)
    dst.mkdir()
    (dst / "keep").mkdir()
    os.symlink(host, dst / "planted-dir")
    os.symlink(host / "secret", dst / "keep" / "planted-file")
    result = copy(f"{src}/", f"{dst}/", _opts(delete_extraneous=True))
    assert result.ok, result.errors
    assert not os.path.lexists(dst / "planted-dir")
    assert not os.path.lexists(dst / "keep" / "planted-file")
    assert _tree(host) == before
    assert (host / "secret").read_text() == "host data\n"
    assert result.deleted == 2


def test_cp_delete_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    dst.mkdir()
    (dst / "extra").write_text("goes\n")
    args = ["cp", f"{src}/", f"{dst}/", "--chunk-size", "64K", "--no-progress"]
    assert cp_main([*args, "--delete"]) == 0
    assert not (dst / "extra").exists()
    assert "1 deleted" in capsys.readouterr().err


# -- S3 destination ------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_destination_loses_objects_the_source_lacks(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    _source(src)
    s3 = S3Options(endpoint_url=moto_s3.endpoint, client="boto3")
    client = moto_s3.client()
    for key in ["vol/stale.txt", "vol/keep/old/x", "vol/old-dir/", "outside/x", "vol2/y"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"old")
    result = copy(f"{src}/", f"s3://{bucket}/vol/", _opts(delete_extraneous=True), s3=s3)
    assert result.ok, result.errors
    assert result.deleted == 3
    assert _keys(moto_s3, bucket) == [
        "outside/x",
        "vol/a.txt",
        "vol/empty/",
        "vol/keep/b.txt",
        "vol/keep/big.bin",
        "vol/keep/deeper/c.txt",
        "vol2/y",
    ]


class _FailingPutStore(Boto3Store):
    """Refuses every upload of one key (not transient): that file fails."""

    def put(self, bucket: str, key: str, data: bytes, metadata: Mapping[str, str]) -> str:
        if key.endswith("/a.txt"):
            raise PermissionError("denied by the test")
        return super().put(bucket, key, data, metadata)


@pytest.mark.s3
def test_s3_nothing_deleted_after_a_failed_file(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    bucket = moto_s3.make_bucket(bucket_name)
    src = tmp_path / "src"
    _source(src)
    moto_s3.client().put_object(Bucket=bucket, Key="vol/stale.txt", Body=b"old")
    store = _FailingPutStore(settings=S3Settings(endpoint_url=moto_s3.endpoint))
    try:
        result = copy(f"{src}/", f"s3://{bucket}/vol/", _opts(delete_extraneous=True), store=store)
    finally:
        store.close()
    assert not result.ok and result.files_failed == 1
    assert result.deleted == 0
    assert "vol/stale.txt" in _keys(moto_s3, bucket)
    s3 = S3Options(endpoint_url=moto_s3.endpoint, client="boto3")
    again = copy(f"{src}/", f"s3://{bucket}/vol/", _opts(delete_extraneous=True), s3=s3)
    assert again.ok and again.deleted == 1
    assert "vol/stale.txt" not in _keys(moto_s3, bucket)


@pytest.mark.s3
def test_s3_to_local_mirror_after_a_move_between_hosts(
    moto_s3: S3Server, bucket_name: str, tmp_path: Path
) -> None:
    """Stage-in on a host that held the volume before: files removed elsewhere go here."""
    bucket = moto_s3.make_bucket(bucket_name)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _source(src)
    s3 = S3Options(endpoint_url=moto_s3.endpoint, client="boto3")
    assert copy(f"{src}/", f"s3://{bucket}/vol/", _opts(), s3=s3).ok
    assert copy(f"s3://{bucket}/vol/", f"{dst}/", _opts(), s3=s3).ok
    moto_s3.client().delete_object(Bucket=bucket, Key="vol/keep/b.txt")
    result = copy(f"s3://{bucket}/vol/", f"{dst}/", _opts(delete_extraneous=True), s3=s3)
    assert result.ok, result.errors
    assert result.deleted == 1
    assert not (dst / "keep" / "b.txt").exists() and (dst / "keep" / "big.bin").exists()
