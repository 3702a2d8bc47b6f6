"""Load-time checksum verification of rank files, remembered while the file is unchanged.

A rank file with flipped bytes has the right size and a valid header, so without a
checksum it loads and the model prints garbage with exit 0. Every load therefore checks
the file against the digest its manifest records (`kimi_trt.checksum.hash_file` with the
manifest's algorithm). Hashing a 130 GB rank file still takes the time to read it (and
over a minute of CPU for old sha256 manifests), so a successful check is remembered in
`<dir>/.verified/<file>.json` keyed on what any change to the file changes - size, mtime, ctime (which no user can set back), inode and device - and on the
expected digest; the next load with the same key only stats the file. A copied or
rewritten file gets a new key and is hashed again. Directories that are not writable
simply verify on every load.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kimi_trt.checksum import hash_file
from kimi_trt.errors import CheckpointError
from kimi_trt.json_files import read_json_or

CACHE_DIR = ".verified"


def _key(path: Path, algorithm: str, digest: str) -> dict[str, Any]:
    st = path.stat()
    return {
        "algorithm": algorithm,
        "digest": digest,
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


def _cache_file(path: Path) -> Path:
    return path.parent / CACHE_DIR / f"{path.name}.json"


def _remembered(path: Path, key: dict[str, Any]) -> bool:
    return read_json_or(_cache_file(path), None) == key


def _remember(path: Path, key: dict[str, Any]) -> None:
    """Best effort: a read-only directory just means verifying again next time."""
    cache = _cache_file(path)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        cache.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(key))
        os.replace(tmp, cache)


def verify_file(path: Path, algorithm: str, digest: str) -> bool:
    """Raise CheckpointError when `path` does not hash to `digest`; True when it was hashed
    now, False when an unchanged file's earlier verification was reused."""
    key = _key(path, algorithm, digest)
    if _remembered(path, key):
        return False
    got = hash_file(path, algorithm)
    if got != digest:
        raise CheckpointError(
            f"{path}: {algorithm} {got[:16]}... does not match the manifest's {digest[:16]}...: "
            "the file is corrupt or was replaced; convert (or copy) it again"
        )
    if _key(path, algorithm, digest) == key:  # unchanged while it was read
        _remember(path, key)
    return True
