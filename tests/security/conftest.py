"""The security tier: the attacks of docs/security.md's threat model, each made through the
interface the attacker really has (a container writing in its volume, through the real dockerd).
The property is always "nothing outside the volume changed", checked on a sentinel directory
outside every allowed path.

The dockerd, stowage and image fixtures (`e2e`, `e2e_base`, ...) are the e2e tier's, registered
once for the session in tests/conftest.py: running tests/e2e and tests/security together starts
one private dockerd.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest


@pytest.fixture
def outside(e2e_base: Path, allowed_dir: Path) -> Path:
    """A fresh host directory outside every --allowed-path of the session's stowage: where an
    escape would land. It lives in the session directory, so teardown removes it whatever the
    test did (even if the attack wrote into it as root)."""
    path = e2e_base / f"outside-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    assert not path.is_relative_to(allowed_dir)
    return path
