"""The copy-up marker: a file put in an otherwise empty staged volume while it is mounted.

Why: Docker copies the image's content into an *empty* volume at container create; in a staged
volume those files would then be staged out as if the user had written them. The marker keeps
the volume non-empty; it is taken out again before stage-out and at the last Unmount.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from plugin.confined import Tree

log = logging.getLogger(__name__)

MARKER_NAME = ".stowage-staged"
MARKER_TEXT = (
    "Placed by stowage in an empty staged volume so that Docker does not copy image content\n"
    "into it. It is never staged out; deleting it is harmless.\n"
)


def ensure_marker(data: Path) -> None:
    """Put the marker in *data* if that is empty; a failure is logged, never raised."""
    try:
        with Tree.at(data) as tree:
            if tree.scandir(""):
                return
            fd = tree.create_file(MARKER_NAME, mode=0o644)
            with open(fd, "w") as fh:
                fh.write(MARKER_TEXT)
    except OSError as exc:
        log.warning("cannot place %s in %s: %s", MARKER_NAME, data, exc)


def drop_marker(data: Path) -> None:
    """Delete the marker from *data* if it is there and still ours (same text)."""
    with contextlib.suppress(OSError), Tree.at(data) as tree:
        with open(tree.open_file(MARKER_NAME)) as fh:
            ours = fh.read(len(MARKER_TEXT) + 1) == MARKER_TEXT
        if ours:
            tree.unlink(MARKER_NAME)
