"""The mirror step (`CopyOptions.delete_extraneous`): after a complete, failure-free copy,
delete what the destination holds that the source does not.

It runs only when every file was copied or found unchanged and the source listing was whole
(any recorded error, a skipped special file or an unreadable directory included, means the
source may hold more than was seen: nothing is deleted). The engine's own `.stowage.*` part and
journal files are never deleted, in a tree or as keys. Local deletions go through the
destination's `plugin.confined.Tree`: a link planted in the destination is deleted, never
followed.
"""

from __future__ import annotations

import logging
import stat

from plugin.s3.store import ObjectStore
from plugin.staging.context import Plan, RunContext, bind
from plugin.staging.errors import StagingError
from plugin.staging.localfs import TEMP_PREFIX
from plugin.staging.locations import S3Location

log = logging.getLogger(__name__)

#: DeleteObjects takes at most this many keys.
DELETE_BATCH = 1000


class _ListingError(Exception):
    pass


def _ours(rel: str) -> bool:
    """True for the engine's own temporary names, at any depth."""
    return any(part.startswith(TEMP_PREFIX) for part in rel.split("/"))


def _beneath(rel: str, dirs: set[str]) -> bool:
    """True if an ancestor directory of *rel* is in *dirs*."""
    pos = rel.find("/")
    while pos > 0:
        if rel[:pos] in dirs:
            return True
        pos = rel.find("/", pos + 1)
    return False


def delete_local(ctx: RunContext, plan: Plan) -> int:
    """Delete files, links and directories beneath the local destination that the source
    does not have; returns how many entries went (a directory's contents included)."""
    keep = {t.dst for t in plan.files} | {d.dst for d in plan.dirs}
    tree = ctx.dt

    def unreadable(rel: str, exc: OSError) -> None:
        raise _ListingError(f"cannot list {tree.display(rel)} ({exc.strerror}); nothing deleted")

    try:
        listed = list(tree.walk(unreadable, skip=lambda name: name.startswith(TEMP_PREFIX)))
    except _ListingError as exc:
        ctx.record_error("", f"delete of extraneous files: {exc}")
        return 0
    deleted = 0
    gone: set[str] = set()  # directories deleted, with their contents
    for rel, st in listed:
        if rel in keep:
            continue
        if _beneath(rel, gone):
            deleted += 1  # went with its directory
            continue
        ctx.check_stop()
        try:
            if stat.S_ISDIR(st.st_mode):
                tree.rmtree(rel)
                gone.add(rel)
            else:
                tree.unlink(rel, missing_ok=True)
        except OSError as exc:
            ctx.record_error(rel, f"cannot delete (not in the source): {exc.strerror or exc}")
            continue
        deleted += 1
    if deleted:
        log.info("deleted %d entries of %s not in the source", deleted, tree.display(""))
    return deleted


def delete_s3(ctx: RunContext, plan: Plan, store: ObjectStore, bucket: str) -> int:
    """Delete objects under the destination prefix that this source did not produce (files,
    links, and the `dir/` markers of its directories), listed when the copy was planned;
    returns how many were deleted."""
    assert isinstance(ctx.dst, S3Location)
    prefix = ctx.dst.dir_prefix
    keep = {t.dst for t in plan.files} | {d.dst + "/" for d in plan.dirs} | {prefix}
    doomed = [
        key
        for key in sorted(plan.dst_index)
        if key.startswith(prefix) and key not in keep and not _ours(key[len(prefix) :])
    ]
    deleted = 0
    for i in range(0, len(doomed), DELETE_BATCH):
        batch = doomed[i : i + DELETE_BATCH]
        try:
            what = f"DELETE {len(batch)} objects under {ctx.dst}"
            ctx.retry(what, bind(store.delete_many, bucket, batch))
        except StagingError as exc:
            ctx.record_error("", f"delete of extraneous objects: {exc}")
            break
        deleted += len(batch)
    if deleted:
        log.info("deleted %d objects under %s not in the source", deleted, ctx.dst)
    return deleted
