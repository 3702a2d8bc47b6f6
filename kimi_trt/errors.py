"""Error types that map to the CLI's exit codes (docs/design.md: 2 user error, 3 missing capability).

Every stage raises these with a one-line message that names the file, tensor or key and
what was expected; `kimi_trt.cli` turns them into that line on stderr and the exit code,
never a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (file, key, value, layout). Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config.json or YAML file is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint file or tensor is missing, truncated or of the wrong dtype/shape."""


class MissingCapability(RuntimeError):
    """This host cannot do the requested step (no GPU, no tensorrt_llm). Exit code 3."""

    exit_code = 3
