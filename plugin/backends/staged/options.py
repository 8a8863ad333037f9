"""The options of a staged volume (`-o stage_in=...`, `-o stage_out=...`): their table, each
value's check, and the checks across options, parsed into a `StagingConfig`.

Why apart from the jobs: Create validates options long before anything is staged, and the
local backend lists this table next to its own in the unknown-option message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from plugin import options as opt
from plugin.errors import InvalidOptionError
from plugin.units import parse_seconds

#: Default and ceiling of how long Mount waits for stage-in: Docker gives Mount two minutes.
DEFAULT_STAGE_TIMEOUT_S = 60.0
MAX_STAGE_TIMEOUT_S = 110.0


def _check_stage_in(value: str) -> str:
    if value.lower().startswith("s3://"):
        return _check_s3_url(value)
    if not value.startswith("/") or "\0" in value:
        raise ValueError("expected s3://bucket/prefix or an absolute host path")
    return value


def _check_dir_markers(value: str) -> str:
    from plugin.s3.markers import check_dir_markers

    return check_dir_markers(value)


def _check_s3_url(value: str) -> str:
    if not value.lower().startswith("s3://"):
        raise ValueError("expected s3://bucket/prefix")
    try:
        opt.check_bucket_name(value[5:].partition("/")[0])
    except ValueError as exc:
        raise ValueError(f"expected s3://bucket/prefix: {exc}") from None
    if "\0" in value or "\n" in value:
        raise ValueError("must not contain NUL or newline characters")
    return value


def _check_policy(value: str) -> str:
    if value.strip().lower() not in ("once", "always"):
        raise ValueError("expected once or always")
    return value


def parse_stage_timeout(value: str) -> float:
    """Seconds Mount waits for stage-in (also the registry's lease wait)."""
    return parse_seconds(value, 1, MAX_STAGE_TIMEOUT_S, why="Docker gives Mount two minutes")


def parse_rate(value: str) -> int:
    rate = opt.parse_size(value)
    if rate < 1024:
        raise ValueError("expected at least 1K bytes per second")
    return rate


OPTION_SPECS: tuple[opt.OptionSpec, ...] = (
    opt.OptionSpec(
        "stage_in", "fill the volume from s3://bucket/prefix or a host path", _check_stage_in
    ),
    opt.OptionSpec(
        "stage_in_policy",
        "once (default: first mount only) or always (refresh at every first mount)",
        _check_policy,
    ),
    opt.OptionSpec("prefetch", "true: start stage-in at create, in the background", opt.parse_bool),
    opt.OptionSpec(
        "stage_out",
        "upload new and changed files to s3://bucket/prefix after the last unmount",
        _check_s3_url,
    ),
    opt.OptionSpec(
        "stage_out_mirror",
        "true: stage-out also deletes remote objects gone locally",
        opt.parse_bool,
    ),
    opt.OptionSpec(
        "stage_timeout",
        "seconds Mount waits for stage-in (default 60, max 110)",
        parse_stage_timeout,
    ),
    opt.OptionSpec("stage_bwlimit", "staging bandwidth limit in bytes/s, e.g. 50M", parse_rate),
    opt.OptionSpec(
        "discard_unstaged",
        "true: `docker volume rm` may drop data that stage-out has not uploaded",
        opt.parse_bool,
    ),
    opt.OptionSpec(
        "dir_markers",
        "`dir/` objects for empty directories at stage-out: auto (default: what the server "
        "can keep, asked at stage-out; rclone serve s3 cannot), true or false",
        _check_dir_markers,
    ),
    opt.OptionSpec(
        "preserve_owner",
        "true: staged files keep the uid/gid recorded in the source (S3 x-amz-meta-uid/gid "
        "included); default: the volume's uid=/gid= options, else root",
        opt.parse_bool,
    ),
    opt.OptionSpec("endpoint", "S3 endpoint URL of stage_in/stage_out", opt.check_url),
    opt.OptionSpec("region", "S3 region of stage_in/stage_out", opt.check_text),
    opt.OptionSpec("profile", "named profile from the daemon's credentials", opt.check_text),
)
S3_ONLY = ("endpoint", "region", "profile", "dir_markers")
STAGE_IN_ONLY = ("stage_in_policy", "prefetch", "stage_timeout")
#: Options that mean nothing without stage_in or stage_out.
STAGED_ONLY = (
    *S3_ONLY,
    *STAGE_IN_ONLY,
    "stage_out_mirror",
    "stage_bwlimit",
    "discard_unstaged",
    "preserve_owner",
)


@dataclass(frozen=True)
class StagingConfig:
    """A volume's staging options, parsed."""

    stage_in: str | None = None
    policy: str = "once"
    prefetch: bool = False
    stage_out: str | None = None
    mirror: bool = False
    timeout: float = DEFAULT_STAGE_TIMEOUT_S
    bwlimit: int | None = None
    discard: bool = False
    #: None: `auto`, asked of the server at stage-out.
    dir_markers: bool | None = None
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    preserve_owner: bool = False
    #: The volume's uid=/gid= options: the owner of every staged file (-1: unchanged).
    owner: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, opts: Mapping[str, str]) -> StagingConfig:
        if "stage_in" not in opts and "stage_out" not in opts:
            return _INACTIVE
        timeout = opts.get("stage_timeout")
        bwlimit = opts.get("stage_bwlimit")
        markers = opts.get("dir_markers", "auto").strip().lower()
        return cls(
            stage_in=opts.get("stage_in") or None,
            policy=opts.get("stage_in_policy", "once").strip().lower(),
            prefetch=opt.parse_bool(opts.get("prefetch", "false")),
            stage_out=opts.get("stage_out") or None,
            mirror=opt.parse_bool(opts.get("stage_out_mirror", "false")),
            timeout=parse_stage_timeout(timeout) if timeout else DEFAULT_STAGE_TIMEOUT_S,
            bwlimit=parse_rate(bwlimit) if bwlimit else None,
            discard=opt.parse_bool(opts.get("discard_unstaged", "false")),
            dir_markers=None if markers == "auto" else opt.parse_bool(markers),
            endpoint=opts.get("endpoint"),
            region=opts.get("region"),
            profile=opts.get("profile"),
            preserve_owner=opt.parse_bool(opts.get("preserve_owner", "false")),
            owner=_owner_option(opts),
        )

    @property
    def active(self) -> bool:
        return bool(self.stage_in or self.stage_out)

    @property
    def stage_in_is_s3(self) -> bool:
        return bool(self.stage_in and self.stage_in.lower().startswith("s3://"))


_INACTIVE = StagingConfig()


def _owner_option(opts: Mapping[str, str]) -> tuple[int, int] | None:
    if "uid" not in opts and "gid" not in opts:
        return None
    uid = opt.parse_id(opts["uid"]) if "uid" in opts else -1
    gid = opt.parse_id(opts["gid"]) if "gid" in opts else -1
    return uid, gid


def _refuse_present(options: Mapping[str, str], keys: tuple[str, ...], problem: str) -> None:
    """InvalidOptionError "option(s) X <problem>" naming those of *keys* in *options*."""
    stray = sorted(k for k in keys if k in options)
    if stray:
        raise InvalidOptionError(f"option(s) {', '.join(stray)} {problem}")


def validate_options(options: Mapping[str, str]) -> StagingConfig:
    """Checks across options (the table checks each value alone); returns the parsed config."""
    config = StagingConfig.from_options(options)
    if not config.active:
        _refuse_present(
            options,
            STAGED_ONLY,
            "only apply to staged volumes: add -o stage_in=s3://bucket/prefix (or a host path) "
            "or -o stage_out=s3://bucket/prefix",
        )
        return config
    if "path" in options:
        raise InvalidOptionError(
            "stage_in/stage_out apply to managed local volumes, not to path= volumes (stowage "
            "never writes staged data into a host directory you own); drop path="
        )
    if not config.stage_in:
        _refuse_present(
            options, STAGE_IN_ONLY, "need -o stage_in=s3://bucket/prefix or a host path"
        )
    if "stage_out_mirror" in options and not config.stage_out:
        raise InvalidOptionError("stage_out_mirror needs -o stage_out=s3://bucket/prefix")
    if not (config.stage_in_is_s3 or config.stage_out):
        _refuse_present(options, S3_ONLY, "apply to S3 staging only, and stage_in is a host path")
    return config


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of s3://bucket/prefix."""
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")
