"""Planning a copy: list the source (totals for progress come from it), open or index the
destination, and pair every source entry with its destination name.

Local trees are opened once as `plugin.confined.Tree`s and kept in the run context: every name
beneath them is reached through descriptors, never by a path string.
"""

from __future__ import annotations

import os
import stat

from plugin.confined import Tree, UnsafePathError
from plugin.s3.metadata import parse_mtime
from plugin.staging import localfs
from plugin.staging.context import Plan, RunContext, Target
from plugin.staging.errors import SourceNotFoundError
from plugin.staging.localfs import Entry
from plugin.staging.locations import LocalLocation, S3Location, safe_relpath


def plan(ctx: RunContext) -> Plan:
    """List the source; returns its files and symlinks and its directories (parents first)
    with their destinations. Opens the local trees into *ctx*."""
    if isinstance(ctx.src, LocalLocation):
        entries, single = _list_local(ctx, ctx.src)
    else:
        entries, single = _list_s3(ctx, ctx.src)
    if single is not None:
        out = Plan([], [], single=True)
        out.files.append(Target(entries[0], single, _single_destination(ctx, out, single)))
        return out
    out = Plan([], [])
    dst = ctx.dst
    if isinstance(dst, S3Location):
        dst_prefix = dst.dir_prefix
        store = ctx.store
        assert store is not None
        objects = ctx.retry(f"LIST {dst}", lambda: list(store.list_objects(dst.bucket, dst_prefix)))
        out.dst_index = {obj.key: obj for obj in objects}
    else:
        dst_prefix = ""
        existed = os.path.isdir(dst.path)
        ctx.dst_tree = Tree.at(dst.path, create=True, no_symlinks=dst.no_symlinks)
        if not existed:
            out.fresh_dirs.add("")
    src_prefix = ctx.src.dir_prefix if isinstance(ctx.src, S3Location) else ""
    for e in entries:
        t = Target(e, src_prefix + e.rel, dst_prefix + e.rel)
        (out.dirs if e.kind == "dir" else out.files).append(t)
    out.dirs.sort(key=lambda t: t.entry.rel)
    return out


def _list_local(ctx: RunContext, src: LocalLocation) -> tuple[list[Entry], str | None]:
    try:
        if src.no_symlinks:
            ctx.src_tree = Tree.at(src.path, no_symlinks=True)
            st = os.fstat(ctx.src_tree.fd)
        else:
            st = os.stat(src.path)
    except FileNotFoundError:
        raise SourceNotFoundError(f"source {src.path} does not exist") from None
    except UnsafePathError:
        raise SourceNotFoundError(
            f"source {src.path} now has a symlink in its path; it is not followed"
        ) from None
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read source {src.path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        # A file named on the command line is followed once, like `cp`.
        head, base = os.path.split(os.path.realpath(src.path))
        ctx.src_tree = Tree.at(head)
        entry = localfs.entry_from_stat(base, os.stat(base, dir_fd=ctx.src_tree.fd), str)
        if entry is None or entry.kind != "file":
            raise SourceNotFoundError(f"source {src.path} is not a file or directory")
        return [entry], base
    if ctx.src_tree is None:
        ctx.src_tree = Tree.at(src.path)
    return list(localfs.walk(ctx.src_tree, ctx.record_error)), None


def _list_s3(ctx: RunContext, src: S3Location) -> tuple[list[Entry], str | None]:
    store = ctx.store
    assert store is not None
    if src.key and not src.trailing_slash:
        info = ctx.retry(f"HEAD {src}", lambda: store.head(src.bucket, src.key))
        if info is not None:
            ns = parse_mtime(info.metadata.get("mtime"))
            mtime_ns = ns if ns is not None else int(info.last_modified * 1e9)
            entry = Entry("", "file", size=info.size, mtime_ns=mtime_ns, etag=info.etag)
            return [entry], src.key
    prefix = src.dir_prefix
    entries = []
    seen_dirs: set[str] = set()
    objects = ctx.retry(f"LIST {src}", lambda: list(store.list_objects(src.bucket, prefix)))
    for obj in objects:
        rel = obj.key[len(prefix) :]
        if not rel:
            continue
        is_dir = rel.endswith("/")
        rel = rel.rstrip("/")
        if not safe_relpath(rel):
            ctx.record_error(obj.key, "key is not a safe relative path; not copied")
            continue
        parts = rel.split("/")
        for i in range(1, len(parts) + (1 if is_dir else 0)):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append(Entry(d, "dir", mode=0o755))
        if not is_dir:
            mtime_ns = int(obj.last_modified * 1e9)
            entries.append(Entry(rel, "file", size=obj.size, mtime_ns=mtime_ns, etag=obj.etag))
    if not entries:
        raise SourceNotFoundError(f"no objects under {src}: check the bucket and prefix")
    return entries, None


def _single_destination(ctx: RunContext, out: Plan, src_name: str) -> str:
    base = os.path.basename(src_name.rstrip("/"))
    dst = ctx.dst
    if isinstance(dst, LocalLocation):
        # The path the user gave is trusted; the name written in it is not followed.
        if dst.trailing_slash or os.path.isdir(dst.path):
            ctx.dst_tree = Tree.at(dst.path, create=True)
            return base
        head, name = os.path.split(dst.path)
        ctx.dst_tree = Tree.at(head, create=True)
        return name
    key = dst.dir_prefix + base if dst.trailing_slash else dst.key
    store = ctx.store
    assert store is not None
    info = ctx.retry(f"HEAD {dst}", lambda: store.head(dst.bucket, key))
    if info is not None:
        out.dst_index[key] = info
    return key
