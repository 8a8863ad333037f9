"""The S3 FUSE filesystem on a real mount against real S3 servers on loopback."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fusemount import REPO, Mount, MountFactory
from harness.s3servers import ACCESS_KEY, SECRET_KEY, S3Server, aws_env

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

MiB = 1 << 20


def get_body(m: Mount, rel: str) -> bytes:
    return bytes(m.client.get_object(Bucket=m.bucket, Key=m.key(rel))["Body"].read())


def head_meta(m: Mount, rel: str) -> dict[str, str]:
    meta = m.client.head_object(Bucket=m.bucket, Key=m.key(rel))["Metadata"]
    return {k.lower(): v for k, v in meta.items()}


def put(m: Mount, rel: str, body: bytes, **meta: str) -> None:
    m.client.put_object(Bucket=m.bucket, Key=m.key(rel), Body=body, Metadata=meta)


def keys(m: Mount, prefix: str = "") -> list[str]:
    out = []
    for page in m.client.get_paginator("list_objects_v2").paginate(
        Bucket=m.bucket, Prefix=m.key(prefix)
    ):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


# -- basic data path --------------------------------------------------------------------------


def test_file_written_through_mount_is_read_by_boto3(mnt: Mount) -> None:
    data = os.urandom(300_000)
    (mnt.path / "hello.bin").write_bytes(data)
    assert get_body(mnt, "hello.bin") == data
    meta = head_meta(mnt, "hello.bin")
    st = os.stat(mnt.path / "hello.bin")
    assert int(meta["mode"]) == st.st_mode
    assert stat.S_ISREG(int(meta["mode"]))
    assert int(meta["uid"]) == os.getuid()
    assert int(meta["gid"]) == os.getgid()
    assert abs(float(meta["mtime"]) - time.time()) < 60


def test_object_put_by_boto3_appears_in_mount(mnt: Mount) -> None:
    put(mnt, "from-boto3.txt", b"hello from boto3")
    put(mnt, "deep/er/nested.txt", b"nested")
    assert (mnt.path / "from-boto3.txt").read_bytes() == b"hello from boto3"
    assert "from-boto3.txt" in os.listdir(mnt.path)
    assert sorted(os.listdir(mnt.path / "deep")) == ["er"]
    assert (mnt.path / "deep" / "er" / "nested.txt").read_bytes() == b"nested"
    assert (mnt.path / "deep").is_dir()


def test_large_file_round_trip_multipart(
    mount_factory: MountFactory, s3_server: S3Server, tmp_path: Path
) -> None:
    m = mount_factory(
        s3_server, extra=["--multipart-threshold", str(16 * MiB), "--part-size", str(5 * MiB)]
    )
    src = tmp_path / "big.src"
    with src.open("wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    f_sum = sha256_file(src)
    with src.open("rb") as fin, (m.path / "big.bin").open("wb") as fout:
        while chunk := fin.read(MiB):
            fout.write(chunk)
    head = m.client.head_object(Bucket=m.bucket, Key="big.bin")
    assert head["ContentLength"] == 48 * MiB
    # rclone recomputes a plain MD5 ETag for the stored file, so ask our own log.
    assert "multipart upload of big.bin: 10 parts" in m.log()
    assert hashlib.sha256(get_body(m, "big.bin")).hexdigest() == f_sum
    # Read back through a second, cold mount so the data comes from S3.
    m2 = mount_factory(s3_server, bucket=m.bucket)
    assert sha256_file(m2.path / "big.bin") == f_sum


def test_random_write_in_middle_of_large_object(mnt: Mount) -> None:
    data = bytearray(os.urandom(20 * MiB))
    put(mnt, "large.bin", bytes(data))
    patch = b"X" * 10_000
    with (mnt.path / "large.bin").open("r+b") as f:
        f.seek(10 * MiB + 123)
        f.write(patch)
    data[10 * MiB + 123 : 10 * MiB + 123 + len(patch)] = patch
    assert hashlib.sha256(get_body(mnt, "large.bin")).digest() == hashlib.sha256(data).digest()


def test_append(mnt: Mount) -> None:
    put(mnt, "log.txt", b"line1\n")
    with (mnt.path / "log.txt").open("ab") as f:
        f.write(b"line2\n")
    with (mnt.path / "log.txt").open("ab") as f:
        f.write(b"line3\n")
    assert get_body(mnt, "log.txt") == b"line1\nline2\nline3\n"
    assert (mnt.path / "log.txt").read_bytes() == b"line1\nline2\nline3\n"


def test_truncate(mnt: Mount) -> None:
    put(mnt, "t.bin", b"0123456789" * 1000)
    os.truncate(mnt.path / "t.bin", 15)
    assert get_body(mnt, "t.bin") == b"012345678901234"
    with (mnt.path / "t.bin").open("r+b") as f:
        f.truncate(20)
    assert get_body(mnt, "t.bin") == b"012345678901234" + b"\0" * 5
    assert os.stat(mnt.path / "t.bin").st_size == 20
    with (mnt.path / "t.bin").open("wb") as f:
        f.write(b"new")
    assert get_body(mnt, "t.bin") == b"new"


def test_unlink(mnt: Mount) -> None:
    (mnt.path / "gone.txt").write_bytes(b"x")
    assert "gone.txt" in keys(mnt)
    os.unlink(mnt.path / "gone.txt")
    assert "gone.txt" not in keys(mnt)
    assert not (mnt.path / "gone.txt").exists()
    with pytest.raises(FileNotFoundError):
        os.unlink(mnt.path / "gone.txt")


def test_mkdir_rmdir(mnt: Mount) -> None:
    d = mnt.path / "newdir"
    d.mkdir()
    assert d.is_dir()
    assert os.listdir(d) == []
    if mnt.server.supports_dir_markers:
        assert "newdir/" in keys(mnt)
    (d / "f").write_bytes(b"1")
    with pytest.raises(OSError) as exc:
        d.rmdir()
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(d / "f")
    d.rmdir()
    assert not d.exists()
    assert not [k for k in keys(mnt) if k.startswith("newdir")]


def test_readdir_of_empty_directory(mnt: Mount) -> None:
    assert os.listdir(mnt.path) == []
    (mnt.path / "empty").mkdir()
    assert os.listdir(mnt.path / "empty") == []
    assert os.listdir(mnt.path) == ["empty"]


def test_rename_file(mnt: Mount) -> None:
    (mnt.path / "a.txt").write_bytes(b"A")
    os.rename(mnt.path / "a.txt", mnt.path / "b.txt")
    assert get_body(mnt, "b.txt") == b"A"
    assert "a.txt" not in keys(mnt)
    assert (mnt.path / "b.txt").read_bytes() == b"A"
    assert not (mnt.path / "a.txt").exists()


def test_rename_directory_with_100_files(mnt: Mount) -> None:
    src = mnt.path / "src"
    src.mkdir()
    (src / "sub").mkdir()
    for i in range(100):
        (src / f"f{i:03d}").write_bytes(f"file {i}".encode())
    (src / "sub" / "inner").write_bytes(b"inner")
    os.rename(src, mnt.path / "dst")
    assert not src.exists()
    names = sorted(os.listdir(mnt.path / "dst"))
    assert names == sorted([f"f{i:03d}" for i in range(100)] + ["sub"])
    assert (mnt.path / "dst" / "f042").read_bytes() == b"file 42"
    assert (mnt.path / "dst" / "sub" / "inner").read_bytes() == b"inner"
    remote = keys(mnt)
    assert not [k for k in remote if k.startswith("src")]
    assert len([k for k in remote if k.startswith("dst/f")]) == 100
    assert get_body(mnt, "dst/sub/inner") == b"inner"


def test_chmod_chown_utime_round_trip_via_s3fs_headers(mnt: Mount) -> None:
    p = mnt.path / "meta.txt"
    p.write_bytes(b"meta")
    os.chmod(p, 0o640)
    os.chown(p, 1234, 5678)
    os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_500_000_000))
    meta = head_meta(mnt, "meta.txt")
    assert int(meta["mode"]) == stat.S_IFREG | 0o640
    assert (meta["uid"], meta["gid"]) == ("1234", "5678")
    assert float(meta["mtime"]) == pytest.approx(1_600_000_000.5)
    assert get_body(mnt, "meta.txt") == b"meta"
    # And the other way: s3fs-style headers written by another tool show up in the mount.
    put(
        mnt,
        "s3fs.txt",
        b"x",
        mode=str(stat.S_IFREG | 0o600),
        uid="42",
        gid="43",
        mtime="1500000000",
    )
    st = os.stat(mnt.path / "s3fs.txt")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (42, 43)
    assert st.st_mtime == 1_500_000_000


def test_chmod_directory(mnt: Mount) -> None:
    d = mnt.path / "d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o700)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    if mnt.server.supports_dir_markers:
        assert int(head_meta(mnt, "d/")["mode"]) == stat.S_IFDIR | 0o700


def test_symlink(mnt: Mount) -> None:
    (mnt.path / "target.txt").write_bytes(b"t")
    os.symlink("target.txt", mnt.path / "link")
    assert os.readlink(mnt.path / "link") == "target.txt"
    assert (mnt.path / "link").read_bytes() == b"t"
    assert get_body(mnt, "link") == b"target.txt"
    assert stat.S_ISLNK(int(head_meta(mnt, "link")["mode"]))
    # An s3fs-style symlink object written by another client.
    put(mnt, "ext-link", b"target.txt", mode=str(stat.S_IFLNK | 0o777))
    assert os.path.islink(mnt.path / "ext-link")
    assert os.readlink(mnt.path / "ext-link") == "target.txt"


def test_statfs(mnt: Mount) -> None:
    st = os.statvfs(mnt.path)
    assert st.f_bavail * st.f_frsize > 1 << 40
    assert st.f_namemax == 255


def test_hard_link_is_refused_with_eperm(mnt: Mount) -> None:
    (mnt.path / "a").write_bytes(b"a")
    with pytest.raises(OSError) as exc:
        os.link(mnt.path / "a", mnt.path / "b")
    assert exc.value.errno == errno.EPERM


def test_mknod_fifo_is_refused(mnt: Mount) -> None:
    with pytest.raises(OSError) as exc:
        os.mkfifo(mnt.path / "fifo")
    assert exc.value.errno == errno.EOPNOTSUPP


def test_readonly_mount_refuses_writes(mount_factory: MountFactory, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="r.txt", Body=b"read me")
    m = mount_factory(s3_server, bucket=bucket, extra=["--readonly"])
    assert (m.path / "r.txt").read_bytes() == b"read me"
    with pytest.raises(OSError) as exc:
        (m.path / "w.txt").write_bytes(b"no")
    assert exc.value.errno == errno.EROFS


def test_prefix_mount(mount_factory: MountFactory, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="vol1/inside.txt", Body=b"in")
    client.put_object(Bucket=bucket, Key="other/outside.txt", Body=b"out")
    m = mount_factory(s3_server, bucket=bucket, prefix="vol1")
    assert os.listdir(m.path) == ["inside.txt"]
    (m.path / "new.txt").write_bytes(b"new")
    assert get_body(m, "new.txt") == b"new"
    assert m.key("new.txt") == "vol1/new.txt"


def test_sequential_read_uses_few_range_requests(
    mount_factory: MountFactory, rclone_server: S3Server
) -> None:
    m = mount_factory(rclone_server)
    data = os.urandom(32 * MiB)
    put(m, "seq.bin", data)
    assert (m.path / "seq.bin").read_bytes() == data
    started, _peak = _fetch_concurrency(m.log(), "seq.bin")
    # 128 KiB kernel reads would be 256 GETs; parts of megabytes need a handful.
    assert 1 <= started <= 8, started


def _fetch_concurrency(log: str, name: str) -> tuple[int, int]:
    """(GETs started, most GETs in flight at once) for *name*, from the debug log: GETs
    into the cache file and streamed ones alike."""
    started = in_flight = peak = 0
    for line in log.splitlines():
        if f"fetch {name} [" in line or f"stream {name} [" in line:
            started += 1
            in_flight += 1
            peak = max(peak, in_flight)
        elif any(
            f"{word} {name} [" in line
            for word in ("fetched", "fetch of", "streamed", "streamed get of")
        ):
            in_flight -= 1
    return started, peak


#: Mount arguments for the two read paths: memory streams (the default for sequential
#: readers) and the cache file alone.
READ_PATHS = {"streamed": [], "cache-file": ["--stream-buffers", "0"]}


def test_sequential_read_is_streamed_past_the_cache_file(
    mount_factory: MountFactory, rclone_server: S3Server
) -> None:
    m = mount_factory(rclone_server)
    data = os.urandom(72 * MiB + 4321)
    put(m, "big.bin", data)
    with open(m.path / "big.bin", "rb", buffering=0) as f:
        got = bytearray()
        while chunk := f.read(MiB):
            got += chunk
        assert got == data
        # Streamed parts never touched the cache file: at most the first read is there.
        allocated = sum(p.stat().st_blocks * 512 for p in m.cache_dir.glob("*.data"))
        assert allocated <= 2 * MiB, allocated
    log = m.log()
    assert log.count("stream big.bin [") >= 4
    _started, peak = _fetch_concurrency(log, "big.bin")
    assert peak >= 2, "streamed parts were fetched one at a time"


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_read_ahead_runs_parallel_gets_and_random_reads_see_right_bytes(
    mount_factory: MountFactory, rclone_server: S3Server, read_path: str
) -> None:
    m = mount_factory(rclone_server, extra=READ_PATHS[read_path])
    data = os.urandom(72 * MiB + 12345)
    put(m, "ra.bin", data)
    fd = os.open(m.path / "ra.bin", os.O_RDONLY)
    try:
        # Random reads first (small fetches), then a sequential pass over everything, which
        # must splice read-ahead parts around the pieces already present.
        for off in (70 * MiB, 5, 33 * MiB + 7, 8 * MiB - 100, len(data) - 10):
            assert os.pread(fd, 4096, off) == data[off : off + 4096], off
        got = bytearray()
        while chunk := os.read(fd, MiB):
            got += chunk
    finally:
        os.close(fd)
    assert len(got) == len(data)
    assert got == data
    log = m.log()
    started, peak = _fetch_concurrency(log, "ra.bin")
    assert peak >= 2, f"read-ahead never had two GETs in flight ({started} GETs)"
    # 8 MiB parts, not one GET per kernel READ.
    assert started <= 20, started


@pytest.mark.parametrize(
    "extra",
    [["--stream-buffers", "2"], ["--stream-buffers", "0", "--readahead-streams", "2"]],
    ids=["streamed", "cache-file"],
)
def test_failed_background_get_gives_eio_never_wrong_bytes(
    mount_factory: MountFactory, private_rclone_server: S3Server, extra: list[str]
) -> None:
    server = private_rclone_server
    # Two parts ahead: read-ahead cannot have fetched the whole object before the server stops.
    m = mount_factory(server, extra=extra)
    data = os.urandom(200 * MiB)
    put(m, "fail.bin", data)
    fd = os.open(m.path / "fail.bin", os.O_RDONLY)
    try:
        pos = 0
        for _ in range(3):  # sequential: read-ahead starts
            chunk = os.read(fd, MiB)
            assert chunk == data[pos : pos + len(chunk)]
            pos += len(chunk)
        server.stop()
        errors = 0
        while pos < len(data):
            try:
                chunk = os.read(fd, MiB)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                errors += 1
                break
            # Whatever did arrive must be the object's bytes, never zeros of a failed GET.
            assert chunk == data[pos : pos + len(chunk)], pos
            if not chunk:
                break
            pos += len(chunk)
        assert errors == 1, "reading 200 MiB with the server down never failed"
        server.start()
        # A later read retries the GET and gets the right bytes.
        os.lseek(fd, 0, os.SEEK_SET)
        got = bytearray()
        while chunk := os.read(fd, MiB):
            got += chunk
        assert got == data
    finally:
        os.close(fd)
    log = m.log()
    assert "fetch of fail.bin" in log or "streamed get of fail.bin" in log


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_object_replaced_during_read_ahead_is_not_mixed_in(
    mount_factory: MountFactory, rclone_server: S3Server, read_path: str
) -> None:
    m = mount_factory(rclone_server, extra=READ_PATHS[read_path])
    old = os.urandom(40 * MiB)
    new = os.urandom(40 * MiB)
    put(m, "swap.bin", old)
    fd = os.open(m.path / "swap.bin", os.O_RDONLY)
    try:
        pos = 0
        chunk = os.read(fd, MiB)
        assert chunk == old[: len(chunk)]
        pos += len(chunk)
        put(m, "swap.bin", new)
        while True:
            try:
                chunk = os.read(fd, MiB)
            except OSError as exc:
                assert exc.errno in (errno.ESTALE, errno.EIO), exc
                break
            if not chunk:
                break
            # Bytes of the old version (fetched before the PUT) are fine; new ones are not.
            assert chunk == old[pos : pos + len(chunk)], pos
            pos += len(chunk)
    finally:
        os.close(fd)


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_write_during_read_ahead_is_not_overwritten(
    mount_factory: MountFactory, rclone_server: S3Server, read_path: str
) -> None:
    m = mount_factory(rclone_server, extra=READ_PATHS[read_path])
    data = bytearray(os.urandom(48 * MiB))
    put(m, "rw.bin", bytes(data))
    fd = os.open(m.path / "rw.bin", os.O_RDWR)
    try:
        assert os.read(fd, MiB) == data[:MiB]
        assert os.read(fd, MiB) == data[MiB : 2 * MiB]  # read-ahead of later parts starts
        for off in (9 * MiB + 3, 20 * MiB, 40 * MiB - 1):
            patch = os.urandom(70_000)
            os.pwrite(fd, patch, off)
            data[off : off + len(patch)] = patch
        os.truncate(fd, 44 * MiB)
        del data[44 * MiB :]
        got = bytearray()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, MiB):
            got += chunk
        assert got == data
    finally:
        os.close(fd)
    assert get_body(m, "rw.bin") == data


def test_sigterm_uploads_dirty_file_before_exit(
    mount_factory: MountFactory, s3_server: S3Server
) -> None:
    m = mount_factory(s3_server)
    fd = os.open(m.path / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"written but never closed")
        os.fsync(fd)
        os.write(fd, b" -- tail")
        assert m.stop() == 0
    finally:
        # The filesystem is gone by now, so close() may fail with ENOTCONN; that is fine.
        with contextlib.suppress(OSError):
            os.close(fd)
    assert get_body(m, "open.txt") == b"written but never closed -- tail"


def test_non_root_user_writes_through_allow_other(
    mount_factory: MountFactory, s3_server: S3Server
) -> None:
    """The mount is usable by a container user other than the mounting root."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found")
    m = mount_factory(s3_server, extra=["--uid", "1000", "--gid", "1000"])
    put(m, "by-boto3.txt", b"owned by the default uid")
    st = os.stat(m.path / "by-boto3.txt")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    os.chmod(m.path, 0o777)
    # pytest's tmp dirs are root-only (0700); the user reaches the mount through an
    # inherited directory fd instead of the path.
    dirfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)

    def as_user(script: str) -> subprocess.CompletedProcess[bytes]:
        cmd = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c"]
        return subprocess.run(
            [*cmd, f"cd /proc/self/fd/{dirfd} && {script}"],
            pass_fds=(dirfd,),
            capture_output=True,
        )

    try:
        r = as_user("echo hi > by-user.txt && cat by-boto3.txt")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"owned by the default uid"
        assert get_body(m, "by-user.txt") == b"hi\n"
        assert head_meta(m, "by-user.txt")["uid"] == "1000"
        # default_permissions: the kernel enforces modes for other users.
        os.chmod(m.path / "by-boto3.txt", 0o600)
        os.chown(m.path / "by-boto3.txt", 0, 0)
        denied = as_user("cat by-boto3.txt")
        assert denied.returncode != 0
        assert b"Permission denied" in denied.stderr
    finally:
        os.close(dirfd)


def test_credentials_from_named_profile_not_argv(
    mount_factory: MountFactory, s3_server: S3Server, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[volume]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    env = aws_env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    m = mount_factory(
        s3_server, extra=["--profile", "volume", "--credentials-file", str(creds)], env=env
    )
    (m.path / "p.txt").write_bytes(b"via profile")
    assert get_body(m, "p.txt") == b"via profile"
    assert SECRET_KEY not in " ".join(m.proc.args)  # type: ignore[arg-type]


def test_bad_credentials_fail_before_ready_with_status_2(
    fuse_available: None, rclone_server: S3Server, tmp_path: Path
) -> None:
    """rclone checks signatures (moto does not), so a wrong secret is refused at startup:
    ready is never signalled (so the daemon's Mount fails with this output), the mount is
    gone, and the exit status is 2 with S3's message."""
    env = aws_env()
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    env["TMPDIR"] = str(tmp_path / "tmp")  # where its temporary cache directory goes
    (tmp_path / "tmp").mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "plugin.fusefs", "--endpoint", rclone_server.endpoint]
    cmd += ["--bucket", rclone_server.new_bucket(), "--max-attempts", "1"]
    cmd += ["--ready-fd", str(write_end), str(mountpoint)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    left_mounted = True
    try:
        out, _ = proc.communicate(timeout=60)
        left_mounted = os.path.ismount(mountpoint)
        signalled = os.read(read_end, 64)
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
    assert proc.returncode == 2, out
    assert signalled == b"", "ready must not be signalled before the bucket answered"
    assert b"cannot access" in out
    assert not left_mounted
    assert list((tmp_path / "tmp").iterdir()) == [], "the empty temporary cache was left behind"


# -- failure handling ------------------------------------------------------------------------


def test_server_down_during_write_gives_eio_and_keeps_data(
    mount_factory: MountFactory, private_rclone_server: S3Server
) -> None:
    server = private_rclone_server
    m = mount_factory(server, extra=["--retry-interval", "1"])
    data = os.urandom(2 * MiB)
    f = (m.path / "precious.bin").open("wb")
    f.write(data)
    server.stop()
    with pytest.raises(OSError) as exc:
        f.close()
    assert exc.value.errno == errno.EIO
    # The data is still in the cache directory, with a journal naming its key.
    cached = [p for p in m.cache_dir.glob("*.data") if p.read_bytes() == data]
    assert cached, list(m.cache_dir.iterdir())
    journal = cached[0].with_suffix(".json").read_text()
    assert "precious.bin" in journal
    # ... and readable through the mount while S3 is away.
    assert (m.path / "precious.bin").read_bytes() == data
    server.start()
    wait_for(lambda: "precious.bin" in keys(m), what="background retry of the upload")
    assert get_body(m, "precious.bin") == data
    wait_for(lambda: not list(m.cache_dir.glob("*.json")), what="journal removal")


def test_fsync_reports_eio_when_server_is_down(
    mount_factory: MountFactory, private_rclone_server: S3Server
) -> None:
    server = private_rclone_server
    m = mount_factory(server)
    fd = os.open(m.path / "f.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        server.stop()
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        server.start()
        os.fsync(fd)  # the retry on the next fsync succeeds
    finally:
        os.close(fd)
    assert get_body(m, "f.bin") == b"abc"


def test_journal_from_previous_run_is_uploaded(
    mount_factory: MountFactory, private_rclone_server: S3Server, tmp_path: Path
) -> None:
    server = private_rclone_server
    cache = tmp_path / "persistent-cache"
    bucket = server.new_bucket()
    m = mount_factory(server, bucket=bucket, cache_dir=cache, extra=["--retry-interval", "600"])
    f = (m.path / "later.txt").open("wb")
    f.write(b"survives a restart")
    server.stop()
    with pytest.raises(OSError):
        f.close()
    assert m.stop() == 1  # exit status says data is still pending
    server.start()
    m2 = mount_factory(server, bucket=bucket, cache_dir=cache, extra=["--retry-interval", "1"])
    wait_for(lambda: "later.txt" in keys(m2), what="recovery of the journaled upload")
    assert get_body(m2, "later.txt") == b"survives a restart"


def test_ls_l_gets_s3fs_metadata_at_listing_without_lookups(
    mount_factory: MountFactory, s3_server: S3Server
) -> None:
    m = mount_factory(s3_server, extra=["--metadata-ttl", "60"])
    names = [f"f{i:02d}" for i in range(40)] + ["odd name+%ü.txt"]
    for i, name in enumerate(names):
        put(
            m,
            f"meta/{name}",
            b"x" * i,
            mode=str(stat.S_IFREG | 0o640 if i % 2 else stat.S_IFREG | 0o604),
            uid=str(1000 + i),
            gid="4242",
            mtime=str(1_500_000_000 + i),
        )
    put(m, "meta/plain", b"no metadata")
    if s3_server.supports_dir_markers:
        m.client.put_object(
            Bucket=m.bucket,
            Key=m.key("meta/sub/"),
            Body=b"",
            Metadata={"mode": str(stat.S_IFDIR | 0o710), "uid": "7", "gid": "8"},
        )
    m.client.put_object(Bucket=m.bucket, Key=m.key("meta/sub/inner"), Body=b"")
    out = subprocess.run(
        ["ls", "-ln", "--time-style=+%s", str(m.path / "meta")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {line.split()[-1]: line.split() for line in out.splitlines()[1:] if line}
    for i, name in enumerate(names[:-1]):
        perms, _, uid, gid, size, mtime = rows[name][:6]
        assert perms == ("-rw-r-----" if i % 2 else "-rw----r--"), (name, perms)
        assert (uid, gid, size, mtime) == (str(1000 + i), "4242", str(i), str(1_500_000_000 + i))
    st = os.lstat(m.path / "meta" / names[-1])
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o604, 1040)
    assert rows["plain"][0] == "-rw-r--r--"
    if s3_server.supports_dir_markers:
        assert rows["sub"][0] == "drwx--x---" and rows["sub"][2:4] == ["7", "8"]
    # Everything came with READDIRPLUS and a TTL: `ls -l` sent no LOOKUP per entry.
    log = m.log()
    lookups = [line for line in log.splitlines() if "lookup " in line and "b'f" in line]
    assert not lookups, lookups[:5]
    assert "HEADs in" in log
    if s3_server.kind == "rclone":
        # ... and the HEADs went over the signed fast path (rclone checks signatures), odd
        # key names included, without falling back to boto3. (moto's server may drop
        # pipelined requests; the fallback covers it, checked by the asserts above.)
        assert "asking boto3" not in log and "fell back" not in log and "path off" not in log
        assert "refused by the server" not in log


# -- scale ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_directory_with_10000_objects_lists_completely(
    mount_factory: MountFactory, rclone_server: S3Server
) -> None:
    bucket = rclone_server.new_bucket()
    client = rclone_server.client(max_pool_connections=32)
    names = [f"obj-{i:05d}" for i in range(10_000)]

    def _put(name: str) -> None:
        client.put_object(Bucket=bucket, Key=f"many/{name}", Body=b"")

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(_put, names))
    m = mount_factory(rclone_server, bucket=bucket)
    start = time.monotonic()
    listed = os.listdir(m.path / "many")
    elapsed = time.monotonic() - start
    assert sorted(listed) == names
    assert len(set(listed)) == 10_000
    # Linear work: ten ListObjectsV2 pages, not one listing per READDIR.
    assert m.log().count("list many/") <= 12 or elapsed < 30, elapsed
    # A second listing (entries now known) is consistent too.
    assert len(os.listdir(m.path / "many")) == 10_000
    out = subprocess.run(["ls", "-f", str(m.path / "many")], capture_output=True, check=True)
    assert len(out.stdout.split()) == 10_000


def test_change_by_another_client_is_seen_after_ttl(mnt: Mount) -> None:
    (mnt.path / "shared.txt").write_bytes(b"version one")
    assert (mnt.path / "shared.txt").read_bytes() == b"version one"
    put(mnt, "shared.txt", b"version two, longer")
    time.sleep(1.5)  # the fixture mounts with --metadata-ttl 1
    assert (mnt.path / "shared.txt").read_bytes() == b"version two, longer"
    mnt.client.delete_object(Bucket=mnt.bucket, Key="shared.txt")
    time.sleep(1.5)
    assert not (mnt.path / "shared.txt").exists()


def test_concurrent_writers_to_different_files(mnt: Mount) -> None:
    def _write(i: int) -> None:
        (mnt.path / f"c{i}.bin").write_bytes(bytes([i]) * 100_000)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(_write, range(16)))
    for i in range(16):
        assert get_body(mnt, f"c{i}.bin") == bytes([i]) * 100_000


def test_mount_is_nosuid_and_nodev(mnt: Mount) -> None:
    """Bucket metadata may claim a setuid-root program or a device node (security issue,
    attack 5): the mount itself must make both inert, whatever a kernel or libfuse default."""
    put(mnt, "suid", b"#!/bin/sh\n", mode=str(0o104755), uid="0", gid="0")
    assert (mnt.path / "suid").exists()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt.path):
            options = set(fields[5].split(","))
            assert {"nosuid", "nodev"} <= options, options
            return
    raise AssertionError(f"{mnt.path} not in /proc/self/mountinfo")
