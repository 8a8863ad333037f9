"""Staged local volumes (`-o stage_in=`, `-o stage_out=`): a local directory filled from S3 or
a host path at the first Mount and uploaded to S3 after the last Unmount.

Modules: `options` (the option table and its checks), `state` (persisted job state and the
in-memory volume), `stager` (the hooks the local backend calls), `jobs` (stage-in/out threads
and the copy engine), `marker` (the copy-up marker), `reach` (Create's bucket check),
`mirror` (stage-out's deletion of remote objects gone locally).
"""

from plugin.backends.staged.options import OPTION_SPECS, StagingConfig, validate_options
from plugin.backends.staged.stager import Stager

__all__ = ["OPTION_SPECS", "Stager", "StagingConfig", "validate_options"]
