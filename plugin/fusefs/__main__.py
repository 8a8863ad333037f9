"""Entry point: `python -m plugin.fusefs --endpoint URL --bucket B [...] MOUNTPOINT`.

Runs in the foreground until the mountpoint is unmounted or SIGTERM/SIGINT arrives; on either
it uploads dirty files before exiting. Exit status: 0 clean, 1 if some data could not be
uploaded (it stays in the cache directory, journaled), 2 on a startup error.
Credentials come from the AWS chain (env, shared files, --profile), never from arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import faulthandler
import functools
import logging
import os
import re
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyfuse3
import trio

from plugin.fusefs.cache import PART_SIZE, DataCache, MiB
from plugin.fusefs.fs import FsConfig, S3Filesystem
from plugin.fusefs.inodes import Defaults
from plugin.fusefs.operations import S3Operations
from plugin.fusefs.stats import report_stats, write_stats
from plugin.fusefs.store import LazyClient, ObjectStore, UploadConfig
from plugin.fusefs.stream import STREAM_BUFFERS, STREAM_PART
from plugin.logs import FORMATS, LEVELS, setup_logging
from plugin.s3 import credentials as creds
from plugin.s3 import fast as s3fast
from plugin.s3.errors import FastPathError

log = logging.getLogger(__name__)


def _octal(value: str) -> int:
    return int(value, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m plugin.fusefs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: AWS for the region)")
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="", help="key prefix to mount (default: whole bucket)")
    p.add_argument("--region")
    p.add_argument("--profile", help="named profile from the shared credentials/config files")
    p.add_argument("--credentials-file", help="shared credentials file to read profiles from")
    p.add_argument(
        "--uid", type=int, default=os.getuid(), help="owner of objects without s3fs metadata"
    )
    p.add_argument(
        "--gid", type=int, default=os.getgid(), help="group of objects without s3fs metadata"
    )
    p.add_argument(
        "--umask",
        type=_octal,
        default=0o022,
        help="permissions mask (octal) for objects without s3fs metadata",
    )
    p.add_argument("--readonly", action="store_true")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="local data cache; keep it persistent so failed uploads survive "
        "(default: a temporary directory)",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=2 << 30,
        help="bytes of clean cached data to keep (dirty data is never evicted)",
    )
    p.add_argument(
        "--metadata-ttl", type=float, default=10.0, help="seconds to trust attributes read from S3"
    )
    p.add_argument("--multipart-threshold", type=int, default=64 * MiB)
    p.add_argument("--part-size", type=int, default=16 * MiB)
    p.add_argument("--upload-concurrency", type=int, default=4)
    p.add_argument(
        "--readahead-max",
        type=int,
        default=8 * PART_SIZE,
        help="largest read-ahead window for sequential readers",
    )
    p.add_argument(
        "--readahead-streams",
        type=int,
        default=8,
        help="parallel ranged GETs (parts of --readahead-part) ahead of a sequential reader",
    )
    p.add_argument(
        "--readahead-part",
        type=int,
        default=PART_SIZE,
        help="bytes per read-ahead GET",
    )
    p.add_argument(
        "--stream-buffers",
        type=int,
        default=STREAM_BUFFERS,
        help=f"{STREAM_PART // MiB} MiB memory buffers that sequential readers of unchanged "
        "files are served from, bypassing the cache file (0: always read through the cache file)",
    )
    p.add_argument(
        "--kernel-readahead-kb",
        type=int,
        default=4096,
        help="the mount's BDI read_ahead_kb, so buffered readers send 1 MiB READs instead of "
        "128 KiB ones (0: leave the kernel's default)",
    )
    p.add_argument(
        "--dir-markers",
        choices=("auto", "true", "false"),
        default="auto",
        help="store directories as 'dir/' marker objects; auto (default): ask the server at "
        "start whether it keeps them (rclone serve s3 on a directory turns them into files)",
    )
    p.add_argument(
        "--no-dir-markers",
        dest="dir_markers",
        action="store_const",
        const="false",
        help="the same as --dir-markers false",
    )
    p.add_argument("--no-writeback-cache", action="store_true")
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="every request through boto3, not the signed-request path (HEAD, LIST, GET)",
    )
    p.add_argument(
        "--retry-interval",
        type=float,
        default=30.0,
        help="seconds between retries of failed uploads",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--read-timeout", type=float, default=60.0)
    p.add_argument("--max-attempts", type=int, default=3, help="attempts per S3 request")
    p.add_argument(
        "--ready-fd",
        type=int,
        help="write 'ready\\n' to this inherited fd once mounted, then close it",
    )
    p.add_argument("--log-level", choices=LEVELS, default="info")
    p.add_argument("--log-format", choices=FORMATS, default="text")
    p.add_argument(
        "--stats-file",
        type=Path,
        help="write counters (bytes read and written, uploads) here as JSON every few seconds, "
        "for the daemon's metrics",
    )
    p.add_argument("--debug-fuse", action="store_true", help="libfuse request tracing")
    return p.parse_args(argv)


#: Control characters a log message shows escaped: a key may hold a newline, and one
#: record must stay one line (a split name reads as two garbled records).
_ESCAPES = {c: f"\\x{c:02x}" for c in range(32) if c != 9} | {10: "\\n", 13: "\\r"}


class OneLineFilter(logging.Filter):
    """Escapes control characters in every message (tracebacks are added after, intact)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = message.translate(_ESCAPES)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def _syncfs(path: str) -> None:
    """syncfs(2) without the GIL. pyfuse3.syncfs holds it, which deadlocks a process that
    syncs its own mount: the kernel's writeback waits for handlers that cannot run."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_kernel_readahead(mountpoint: str, kb: int) -> None:
    """Raise the mount's BDI read-ahead: per-request overhead dominates a Python FUSE, and
    the default 128 KiB makes eight times as many READs as 1 MiB. Best effort (needs root);
    reads /proc/self/mountinfo, because a stat of our own mount could wait on ourselves."""
    if kb <= 0:
        return
    try:
        dev = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                dev = fields[2]  # the last match is the mount on top
        if dev is None:
            log.debug("no mountinfo entry for %s; read-ahead left alone", mountpoint)
            return
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
        log.debug("read_ahead_kb of %s (bdi %s) set to %d", mountpoint, dev, kb)
    except OSError as exc:
        log.info("cannot raise the kernel read-ahead of %s: %s", mountpoint, exc)


async def _handle_signals(fs: S3Filesystem, mountpoint: str) -> None:
    """SIGTERM/SIGINT: push the kernel's dirty pages to us, upload them, then stop.

    The FUSE loop keeps running until terminate(), so writeback can reach our handlers.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: flushing and unmounting", signum)
            try:
                with trio.move_on_after(60):
                    await trio.to_thread.run_sync(_syncfs, mountpoint)
                    await fs.flush_all()
            except Exception:
                log.exception("flush before exit failed")
            pyfuse3.terminate()
            return


def _make_client(args: argparse.Namespace) -> Any:
    """Import boto3 and build the client. Blocking: a worker thread."""
    from plugin.s3 import client as s3client

    settings = s3client.S3Settings(
        endpoint_url=args.endpoint,
        region=args.region,
        profile=args.profile,
        credentials_file=args.credentials_file,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_attempts=args.max_attempts,
        max_pool_connections=32 + 4 * args.upload_concurrency,
    )
    return s3client.make_s3_client(settings)


def _build_client(args: argparse.Namespace) -> tuple[Any, bool]:
    """Build the boto3 client and prove that it works; with `--dir-markers auto`, ask the
    server whether it keeps `dir/` markers. Blocking: a worker thread."""
    client = _make_client(args)
    # Bad credentials or bucket fail here with S3's own message (and exit status 2), not as
    # EIO on the first ls.
    client.list_objects_v2(Bucket=args.bucket, Prefix=args.prefix.strip("/"), MaxKeys=1)
    return client, _dir_markers(args, client)


def _fast_connect(args: argparse.Namespace) -> s3fast.FastClient | None:
    """The mount's hot path without botocore: static keys (plugin.s3.credentials) and one
    signed LIST of the prefix, which proves endpoint, bucket and keys as the boto3 check
    does. None whenever this path cannot answer (no endpoint, keys only botocore can find,
    a proxy, `--dir-markers auto` on a writable mount, any error): then boto3 is asked, and
    its error is the one reported. Blocking: a worker thread."""
    if args.no_fast_path or not args.endpoint:
        return None
    if args.dir_markers == "auto" and not args.readonly:
        return None  # the server has to be probed; that is boto3's job
    keys = creds.static_credentials(args.profile, args.credentials_file)
    if keys is None:
        return None
    url = urlsplit(args.endpoint)
    proxies = urllib.request.getproxies()
    if url.scheme in proxies and not urllib.request.proxy_bypass(url.hostname or ""):
        return None  # botocore goes through the proxy; this path would not
    try:
        client = s3fast.FastClient(
            args.endpoint,
            args.bucket,
            args.region or "us-east-1",
            lambda: keys,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
        )
    except ValueError as exc:
        log.debug("no fast start: %s", exc)
        return None
    try:
        client.list_v2(args.prefix.strip("/"), None, None, 1)
    except FastPathError as exc:
        log.debug("fast bucket check failed (%s); asking boto3", exc)
        client.close()
        return None
    return client


def _dir_markers(args: argparse.Namespace, client: Any) -> bool:
    """The `--dir-markers` answer: as given, or (auto) what the server does. A read-only
    mount writes no markers, so it asks nothing; a probe that cannot tell (writes denied)
    keeps the S3 default. Imports botocore only to probe."""
    if args.dir_markers != "auto":
        return bool(args.dir_markers == "true")
    if args.readonly:
        return True
    from plugin.s3 import markers

    try:
        return markers.dir_markers_supported(client, args.bucket, args.prefix)
    except markers.ProbeError as exc:
        log.warning("cannot tell whether the server keeps 'dir/' markers (%s); using them", exc)
        return True


async def _connect(
    args: argparse.Namespace,
    fs: S3Filesystem,
    store: ObjectStore,
    lazy: LazyClient,
    failed: list[str],
    done: trio.Event,
) -> None:
    """Check the bucket and get the S3 clients; sets *done* once the mount may be used,
    *failed* on error. The signed-request client (no botocore) checks the bucket when it
    can; the boto3 client, needed only for what that client does not do, is then built
    after *done*."""
    fast = await trio.to_thread.run_sync(_fast_connect, args)
    if fast is not None:
        store.fast_client = fast
        _set_dir_markers(fs, _dir_markers(args, None))
        log.debug("bucket checked on the fast path")
        done.set()
        try:
            lazy.set(await trio.to_thread.run_sync(_make_client, args))
        except Exception as exc:
            log.error("cannot build the S3 client: %s", exc)
            lazy.fail(str(exc))
        return
    try:
        client, dir_markers = await trio.to_thread.run_sync(_build_client, args)
    except Exception as exc:
        log.error("cannot access s3://%s at %s: %s", args.bucket, args.endpoint, exc)
        failed.append(str(exc))
        lazy.fail(str(exc))
        done.set()
        return
    if not args.no_fast_path:
        store.fast_client = s3fast.from_boto3_client(
            client,
            args.bucket,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
        )
    lazy.set(client)
    _set_dir_markers(fs, dir_markers)
    log.debug("S3 client ready (dir markers: %s)", dir_markers)
    done.set()


def _set_dir_markers(fs: S3Filesystem, dir_markers: bool) -> None:
    if dir_markers != fs.config.dir_markers:
        # Before ready: no FUSE request has been served yet.
        fs.config = dataclasses.replace(fs.config, dir_markers=dir_markers)


async def _run(
    fs: S3Filesystem,
    mountpoint: str,
    ready_fd: int | None,
    connect: Callable[[list[str], trio.Event], Awaitable[None]],
    stats_file: Path | None = None,
) -> int:
    """Ready is signalled only once the bucket answered: a Mount with bad credentials or a
    dead endpoint then fails with S3's message in Docker's error, instead of handing the
    container a mount that dies a moment later. On the fast path that check is one signed
    LIST, without botocore."""
    startup_failed: list[str] = []
    connected = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, fs, mountpoint)
        nursery.start_soon(connect, startup_failed, connected)
        await connected.wait()
        if not startup_failed:
            nursery.start_soon(fs.retry_failed_uploads)
            if stats_file is not None:
                nursery.start_soon(report_stats, fs, stats_file)
            if ready_fd is not None:
                try:
                    os.write(ready_fd, b"ready\n")
                finally:
                    os.close(ready_fd)
            log.info("mounted s3://%s/%s at %s", fs.store.bucket, fs.prefix, mountpoint)
            await pyfuse3.main()
        nursery.cancel_scope.cancel()
    if startup_failed:
        return 2
    failed = await fs.flush_all()
    await fs.store.aclose()
    if failed:
        log.error(
            "%d file(s) could not be uploaded; their data is kept in %s", failed, fs.cache.cache_dir
        )
    return 1 if failed else 0


def _drop_temp_cache(cache: DataCache) -> None:
    """A cache directory made for this run goes with it, whatever the exit status, unless it
    holds uploads not yet sent: a later run with --cache-dir sends them."""
    if not cache.remove_dir_unless_unsent():
        log.warning(
            "kept %s: it holds uploads not yet sent; mount with --cache-dir %s to send them",
            cache.cache_dir,
            cache.cache_dir,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OneLineFilter())
    # botocore's debug output (signatures, headers) drowns ours and costs CPU per request.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)
    mountpoint = os.path.abspath(args.mountpoint)

    # The bucket is checked (and the clients built) in a worker thread while the loop
    # starts; S3 calls wait for the boto3 client in their worker threads, and ready waits
    # for the check.
    temp_cache = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="stowage-fusefs-")) if temp_cache else args.cache_dir
    lazy = LazyClient()
    store = ObjectStore(lazy, args.bucket)
    cache = DataCache(
        store,
        cache_dir,
        max_size=args.cache_size,
        readahead_max=args.readahead_max,
        readahead_streams=max(1, args.readahead_streams),
        part_size=max(MiB, args.readahead_part),
        stream_buffers=max(0, args.stream_buffers),
        upload=UploadConfig(
            multipart_threshold=args.multipart_threshold,
            part_size=args.part_size,
            concurrency=args.upload_concurrency,
        ),
    )
    try:
        pending = cache.open_dir()
    except (OSError, RuntimeError) as exc:
        log.error("cache directory: %s", exc)
        return 2
    if pending:
        log.warning(
            "%d upload(s) from a previous run are pending; retrying in background", len(pending)
        )
    fs = S3Filesystem(
        store,
        cache,
        FsConfig(
            prefix=args.prefix,
            defaults=Defaults(uid=args.uid, gid=args.gid, umask=args.umask),
            metadata_ttl=args.metadata_ttl,
            readonly=args.readonly,
            dir_markers=args.dir_markers != "false",
            retry_interval=args.retry_interval,
        ),
    )
    fs.pending_journals = pending
    ops = S3Operations(
        fs,
        writeback_cache=not args.no_writeback_cache,
        on_first_open=lambda: set_kernel_readahead(mountpoint, args.kernel_readahead_kb),
    )

    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname=stowage:{args.bucket}", "subtype=stowage", "allow_other"}
    # Bucket metadata (x-amz-meta-mode, -uid) is written by whoever can write the bucket: it
    # must never make a setuid program or a device node work through the mount.
    options |= {"nosuid", "nodev"}
    if args.readonly:
        options.add("ro")
    if args.debug_fuse:
        options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except Exception as exc:
        log.error("cannot mount %s: %s", mountpoint, exc)
        cache.close_dir()
        if temp_cache:
            _drop_temp_cache(cache)
        return 2
    if args.stats_file is not None:
        write_stats(args.stats_file, fs)  # no counters of a previous run survive this one
    try:
        status = trio.run(
            _run,
            fs,
            mountpoint,
            args.ready_fd,
            functools.partial(_connect, args, fs, store, lazy),
            args.stats_file,
        )
    except BaseException:
        log.exception("filesystem loop failed")
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    cache.close_dir()
    if temp_cache:
        _drop_temp_cache(cache)
    if args.stats_file is not None:
        args.stats_file.unlink(missing_ok=True)  # a process that is gone counts nothing
    log.info("unmounted %s (status %d)", mountpoint, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
