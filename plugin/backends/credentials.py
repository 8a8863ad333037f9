"""The daemon's S3 credentials file: named profiles in AWS shared-credentials format.

Secrets never travel in volume options (`docker volume inspect` shows those); volumes name a
profile (`-o profile=NAME`) and the daemon reads it from this file. Legacy daemons keep it at
`<root>/credentials`; a managed plugin gets it from its own settable mount (`--credentials-file`,
env STOWAGE_CREDENTIALS_FILE), so it stays out of the state directory.
"""

from __future__ import annotations

import stat
from pathlib import Path

from plugin.errors import BackendError


class CredentialsFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def usable(self) -> str | None:
        """The file's path if present; refused unless private (0600), since it holds keys."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendError(f"cannot read credentials file {self.path}: {exc}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise BackendError(
                f"credentials file {self.path} is readable by others; run: chmod 600 {self.path}"
            )
        return str(self.path)
