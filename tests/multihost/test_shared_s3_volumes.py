"""An S3 volume mounted on two hosts at once: close-to-open consistency. A file closed on one
host is read whole on the other after at most metadata_ttl seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Hosts
from test_registry import PROPAGATION_S, names, within

TTL_S = 1


def test_file_closed_on_one_host_is_read_whole_on_the_other(hosts: Hosts, moto: Any) -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    a, b = hosts(2)
    bucket = moto.new_bucket()
    opts = {"backend": "s3", "bucket": bucket, "prefix": "shared", "metadata_ttl": str(TTL_S)}
    assert a.client().create("s3vol", opts)["Err"] == ""
    within(PROPAGATION_S, lambda: "s3vol" in names(b))
    mp_a = a.client().mount("s3vol", "a1")
    mp_b = b.client().mount("s3vol", "b1")
    assert mp_a["Err"] == "" and mp_b["Err"] == "", (mp_a, mp_b)
    for version in (b"first", b"second"):
        payload = os.urandom(3 << 20) + version
        with open(Path(mp_a["Mountpoint"], "f.bin"), "wb") as fh:
            fh.write(payload)
        # close() uploaded it; B sees it once its metadata cache entry expires.
        closed = time.monotonic()
        seen = Path(mp_b["Mountpoint"], "f.bin")
        within(TTL_S + 2.5, lambda s=seen, p=payload: s.exists() and s.read_bytes() == p)
        assert time.monotonic() - closed <= TTL_S + 2.5
    assert a.client().unmount("s3vol", "a1")["Err"] == ""
    assert b.client().unmount("s3vol", "b1")["Err"] == ""
