"""Command line: `stowage serve` runs the plugin daemon; `stowage cp` copies,
`stowage volume backup|restore` saves a volume's data and `stowage volume resize` grows a
size-limited volume, all without the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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

    volume = commands.add_parser("volume", help="back up, restore or resize a local volume's data")
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
    resize = actions.add_parser(
        "resize",
        help="grow a size-limited volume (created with -o size=) to SIZE",
        description="Grow the image of a size-limited local volume to SIZE (e.g. 20G) and its "
        "filesystem with it, online: containers using the volume keep running and see the "
        "new space at once. Shrinking is refused. The volume keeps its size= option (Docker "
        "re-sends Create with it); `docker volume inspect` shows the new Status.size.limit.",
    )
    resize.add_argument("name", metavar="NAME")
    resize.add_argument("size", metavar="SIZE")
    add_root_argument(resize)


def run_resize(args: argparse.Namespace) -> int:
    from plugin.backends.local import volume_dir_of
    from plugin.backends.quota import LoopImage, SizeLimitError, parse_volume_size
    from plugin.errors import InvalidNameError
    from plugin.names import validate_name
    from plugin.units import format_bytes as human

    def fail(message: str) -> int:
        print(f"stowage volume resize: {message}", file=sys.stderr)
        return 2

    try:
        size = parse_volume_size(args.size)
    except ValueError as exc:
        return fail(str(exc))
    try:
        volume_dir = volume_dir_of(args.root, validate_name(args.name))
    except InvalidNameError as exc:
        return fail(str(exc))
    image = LoopImage(volume_dir)
    if not image.exists():
        if volume_dir.is_dir():
            return fail(
                f"volume {args.name!r} has no size limit (it was created without -o size=): "
                "there is nothing to grow"
            )
        return fail(f"no local volume {args.name!r} under {args.root}")
    try:
        old, new = image.grow(size)
    except (SizeLimitError, OSError) as exc:
        return fail(f"volume {args.name!r}: {exc}")
    if old == new:
        print(f"stowage volume resize: {args.name} is already {human(new)}", file=sys.stderr)
    else:
        print(
            f"stowage volume resize: {args.name} grown from {human(old)} to {human(new)}",
            file=sys.stderr,
        )
    return 0


def _mount_size_limited(root: Path, name: str) -> None:
    """A size-limited volume's data is in its image: mount it on the data directory if it is
    not (after a reboot, before the daemon ran), or backup would read, and restore write,
    the empty directory beneath it."""
    from plugin.backends.local import volume_dir_of
    from plugin.backends.quota import LoopImage, SizeLimitError
    from plugin.errors import InvalidNameError, PluginError
    from plugin.names import validate_name

    try:
        image = LoopImage(volume_dir_of(root, validate_name(name)))
    except InvalidNameError:  # pragma: no cover - volume_data_dir validated it
        return
    if image.exists():
        try:
            image.mount()
        except (SizeLimitError, OSError) as exc:
            raise PluginError(f"cannot mount the image of volume {name!r}: {exc}") from None


def run_volume(args: argparse.Namespace) -> int:
    if args.action == "resize":
        return run_resize(args)
    from plugin.driver.archive import ArchiveResult
    from plugin.driver.backup import BackupError, backup, restore, volume_data_dir
    from plugin.errors import PluginError
    from plugin.staging.engine import CopyOptions, S3Options

    options = CopyOptions(jobs=max(1, args.jobs))
    s3 = S3Options(endpoint_url=args.endpoint, region=args.region, profile=args.profile)
    try:
        if args.action == "backup":
            data = volume_data_dir(args.root, args.name)
            _mount_size_limited(args.root, args.name)
            result = backup(data, args.dest, options, s3)
        else:
            data = volume_data_dir(args.root, args.name, for_restore=True)
            _mount_size_limited(args.root, args.name)
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
