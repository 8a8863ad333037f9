"""Command line: `stowage serve` runs the plugin daemon; `stowage cp` copies, without it."""

from __future__ import annotations

import argparse
import sys

from plugin import __version__
from plugin.settings import add_serve_arguments, settings_from_args
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
    raise AssertionError(f"unhandled command {args.command!r}")
