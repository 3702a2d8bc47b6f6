"""Where commands write: output directories checked up front, files replaced atomically.

Every command that writes (synth, convert, build, triton-repo) calls `prepare_output_dir`
before producing anything: it creates the directory and proves a file can be created in
it, so an output path whose parent is a file, a read-only directory or /proc is one line
naming the path (exit 2) instead of a traceback halfway through. Files that mark a result
complete are written with `write_json_atomic` (temp file, fsync, rename), so a failure
never leaves half a file under the final name; any other writer (safetensors' save_file, a
copy) writes inside `replacing`, which gives the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kimi_trt.errors import UserError


def prepare_output_dir(path: Path, what: str = "output directory") -> Path:
    """Create `path` (with parents) and check that files can be created in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {what} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kimi-trt-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync, rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


def _file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (rw for whom it allows):
    a file another user's server reads must not stay owner-only because a library chose so."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for the caller to write; when the block ends normally
    it replaces `path` in one rename, when it raises (an error, Ctrl-C, a full disk) the temp
    file is removed. `path` therefore holds its old bytes or the complete new ones, never
    part of a write - a reader (or a rerun) cannot mistake an interrupted file for a result."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a killed run's leftover
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # safetensors' save_file creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
