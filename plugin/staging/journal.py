"""Per-file resume journal for chunked copies into a local temporary file.

The journal sits next to the temporary file (`.stowage.NAME.journal` beside `.stowage.NAME.part`).
Its first line identifies the source version and chunk size as JSON; each following line is the
index of a chunk whose bytes were fully written to the temporary file *before* the line was
appended. A process killed at any point therefore leaves either no record of a chunk or a record
of a complete one (a torn last line is ignored), and a rerun copies only the missing chunks.
A source that changed (size, mtime or ETag) or another chunk size invalidates the journal.

This survives `kill -9` (written data is in the page cache); after a power loss the final
checksum verification catches chunks that never reached the disk.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from plugin.confined import Tree

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class ChunkJournal:
    def __init__(self, tree: Tree, path: str, identity: dict[str, Any]) -> None:
        """*path* is relative to *tree*, the destination: a journal is never written
        through a link planted in its place."""
        self.tree = tree
        self.path = path
        self.identity = {"v": JOURNAL_VERSION, **identity}
        self._fd = -1

    def load(self) -> set[int] | None:
        """Chunks recorded as done, or None if there is no journal for this source version."""
        try:
            with open(self.tree.open_file(self.path), encoding="ascii", errors="replace") as fh:
                lines = fh.read().split("\n")
        except OSError:  # missing, or not a regular file: no usable journal
            return None
        try:
            header = json.loads(lines[0])
        except (ValueError, IndexError):
            log.info("ignoring unreadable journal %s", self.path)
            return None
        if header != self.identity:
            log.info("source changed since journal %s was written; starting over", self.path)
            return None
        done: set[int] = set()
        # The last element is '' after a complete line, or a torn record: ignore it either way.
        for line in lines[1:-1]:
            if line.isdigit():
                done.add(int(line))
        return done

    def start(self, fresh: bool) -> None:
        """Open for appending; *fresh* truncates and writes a new header."""
        if fresh:
            self._fd = self.tree.create_file(self.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._fd = self.tree.open_file(self.path, os.O_WRONLY | os.O_APPEND)
        if fresh:
            os.write(self._fd, (json.dumps(self.identity, sort_keys=True) + "\n").encode())

    def record(self, index: int) -> None:
        """Append one record; a single small O_APPEND write is atomic against other threads."""
        os.write(self._fd, f"{index}\n".encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.tree.unlink(self.path, missing_ok=True)
