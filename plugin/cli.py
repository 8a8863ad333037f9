"""Command line: `stowage serve` runs the plugin daemon; `stowage cp` copies and
`stowage volume backup|restore` saves a volume's data, both without the daemon."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from plugin import __version__
from plugin.options import endpoint_arg
from plugin.settings import add_root_argument, add_serve_arguments, settings_from_args
from plugin.staging.cli import add_cp_parser, run_cp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stowage", description="Docker volume plugin for local-directory and S3 volumes."
    )
    parser.add_argument("--version", action="version", version=f"stowage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the volume plugin daemon",
        description="Serve the Docker volume plugin protocol on a unix socket (legacy plugin: "
        "dockerd discovers /run/docker/plugins/NAME.sock as driver NAME).",
    )
    add_serve_arguments(serve)
    add_cp_parser(commands)
    add_volume_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from plugin.server import ServeError, serve
        from plugin.settings import Settings

        settings: Settings = settings_from_args(args)
        try:
            serve(settings)
        except ServeError as exc:
            print(f"stowage: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "cp":
        return run_cp(args)
    if args.command == "volume":
        return run_volume(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def add_volume_parser(commands: Any) -> None:
    """`stowage volume backup|restore`: a volume's data through the copy core, no daemon."""

    volume = commands.add_parser("volume", help="back up or restore a local volume's data")
    actions = volume.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, first, second, text in (
        ("backup", "name", "dest", "copy volume NAME to DEST (a tree, or NAME.tar.gz)"),
        ("restore", "src", "name", "copy SRC (a tree or a .tar.gz) into volume NAME"),
    ):
        p = actions.add_parser(
            action,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Local paths or s3://bucket/prefix; a "
            "name ending in .tar.gz is an archive compatible with `tar czf X -C /data .`, "
            "anything else a tree copied incrementally.",
        )
        p.add_argument(first, metavar=first.upper())
        p.add_argument(second, metavar=second.upper())
        add_root_argument(p)
        p.add_argument("-j", "--jobs", type=int, default=8, help="parallel transfers")
        p.add_argument(
            "--endpoint", type=endpoint_arg, help="S3 endpoint URL (no credentials in it)"
        )
        p.add_argument("--region", help="S3 region")
        p.add_argument("--profile", help="AWS profile")


def run_volume(args: argparse.Namespace) -> int:
    from plugin.driver.archive import ArchiveResult
    from plugin.driver.backup import BackupError, backup, restore, volume_data_dir
    from plugin.errors import PluginError
    from plugin.staging.engine import CopyOptions, S3Options

    options = CopyOptions(jobs=max(1, args.jobs))
    s3 = S3Options(endpoint_url=args.endpoint, region=args.region, profile=args.profile)
    try:
        if args.action == "backup":
            data = volume_data_dir(args.root, args.name)
            result = backup(data, args.dest, options, s3)
        else:
            data = volume_data_dir(args.root, args.name, for_restore=True)
            result = restore(args.src, data, options, s3)
    except (BackupError, PluginError) as exc:
        print(f"stowage volume {args.action}: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, ArchiveResult):
        for skipped in result.skipped:
            print(f"stowage volume {args.action}: warning: {skipped}", file=sys.stderr)
        verb = "archived" if args.action == "backup" else "restored"
        print(f"stowage volume {args.action}: {result.summary(verb)}", file=sys.stderr)
        return 0
    for err in result.errors[:20]:
        print(f"stowage volume {args.action}: {err.path}: {err.message}", file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    return 0 if result.ok else 1
