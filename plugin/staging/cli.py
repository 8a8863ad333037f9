"""`stowage cp SRC DST`: the copy core on the command line, usable without the daemon.

Credentials come from the standard AWS chain (environment, shared files, `--profile`), never
from arguments, which any local user can read in /proc.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any, TextIO

from plugin.options import endpoint_arg, parse_size
from plugin.staging.engine import DEFAULT_CHUNK_SIZE, CopyOptions, S3Options, copy
from plugin.staging.errors import StagingError
from plugin.staging.progress import Progress
from plugin.units import format_bytes

log = logging.getLogger(__name__)


#: Exit codes: 1 some files failed, 2 nothing could be copied (usage, endpoint), 130 cancelled.
EXIT_PARTIAL, EXIT_FAILED, EXIT_CANCELLED = 1, 2, 130


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cp_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `cp` to a `stowage` subcommand parser (argparse._SubParsersAction)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "cp",
        help="copy files between local paths and S3",
        description="Copy a file or a tree between a local path and s3://bucket/prefix (either "
        "direction) or between local paths. A directory's contents go into DST (like "
        "`rsync SRC/ DST/`). Unchanged files are skipped; an interrupted copy resumes where it "
        "stopped when run again. Credentials come from the AWS environment, shared "
        "credentials files or --profile.",
    )
    p.add_argument("src", metavar="SRC", help="local path or s3://bucket/prefix")
    p.add_argument("dst", metavar="DST", help="local path or s3://bucket/prefix")
    p.add_argument("-j", "--jobs", type=int, default=8, help="parallel transfers (default 8)")
    p.add_argument(
        "--chunk-size",
        type=_size_arg,
        default=DEFAULT_CHUNK_SIZE,
        help="chunk / multipart part size, e.g. 8M (default 8M; parts are at least 5M)",
    )
    p.add_argument("--bwlimit", type=_size_arg, help="bandwidth limit in bytes/s, e.g. 50M")
    p.add_argument(
        "--endpoint",
        type=endpoint_arg,
        help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (no credentials in it)",
    )
    p.add_argument("--region", help="S3 region (default us-east-1)")
    p.add_argument("--profile", help="AWS profile from the shared config/credentials files")
    p.add_argument(
        "--s3-client",
        choices=("auto", "crt", "boto3"),
        default="auto",
        help="S3 byte path: crt (awscrt, fast), boto3, or auto (crt when installed)",
    )
    p.add_argument("--retries", type=int, default=5, help="retries per request (default 5)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checksums and ETags: check sizes only (fast, trusts the store)",
    )
    p.add_argument("--force", action="store_true", help="copy even files that look unchanged")
    p.add_argument("--fsync", action="store_true", help="sync the destination at the end")
    p.add_argument(
        "--delete",
        action="store_true",
        help="mirror: after a copy in which no file failed, delete what DST holds that SRC "
        "does not (objects under the prefix; local files, links and directories). Nothing is "
        "deleted if any file failed or SRC could not be listed whole",
    )
    p.add_argument(
        "--no-dir-markers",
        action="store_true",
        help="do not store empty directories as `dir/` objects (servers without them)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="log retries and decisions")
    p.set_defaults(func=run_cp)
    return p


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "--:--"
    m, s = divmod(int(eta), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """One self-rewriting line on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._width = 0

    def __call__(self, p: Progress) -> None:
        pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        filled = int(pct / 5)
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {pct:5.1f}% "
            f"{format_bytes(p.bytes_done)}/{format_bytes(p.bytes_total)} "
            f"{p.files_done}/{p.files_total} files {format_bytes(p.rate)}/s "
            f"ETA {_fmt_eta(p.eta)}"
        )
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\n")
            self.stream.flush()


def run_cp(args: argparse.Namespace) -> int:
    """Run `stowage cp`; returns the process exit code."""
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="stowage: %(levelname)s %(message)s")
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if show and not args.quiet else None
    cancel = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cancel.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    options = CopyOptions(
        jobs=max(1, args.jobs),
        chunk_size=args.chunk_size,
        bwlimit=args.bwlimit,
        retries=max(0, args.retries),
        verify=not args.no_verify,
        dir_markers=not args.no_dir_markers,
        skip_unchanged=not args.force,
        fsync=args.fsync,
        delete_extraneous=args.delete,
        progress=bar,
        progress_interval=0.2,
        cancel=cancel,
    )
    s3 = S3Options(
        endpoint_url=args.endpoint,
        region=args.region,
        profile=args.profile,
        client=args.s3_client,
    )
    try:
        result = copy(args.src, args.dst, options, s3=s3)
    except StagingError as exc:
        if bar:
            bar.close()
        print(f"stowage cp: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if bar:
        bar.close()
    for err in result.errors[:20]:
        print(f"stowage cp: {err.path}: {err.message}", file=sys.stderr)
    if len(result.errors) > 20:
        print(f"stowage cp: ... and {len(result.errors) - 20} more errors", file=sys.stderr)
    if not args.quiet or not result.ok:
        print(result.summary(), file=sys.stderr)
    if args.verbose:
        # Which check verified the copied files: the store's CRC, MD5 (ETag) or size only.
        print(f"checks: {result.checks_text()}", file=sys.stderr)
    if result.state == "cancelled":
        return EXIT_CANCELLED
    if result.ok:
        return 0
    nothing = result.files_copied == 0 and result.files_skipped == 0 and result.files_total > 0
    return EXIT_FAILED if nothing else EXIT_PARTIAL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stowage")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cp_parser(sub)
    args = parser.parse_args(argv)
    return run_cp(args)


if __name__ == "__main__":
    sys.exit(main())
