"""Reading JSON files the user controls, where every way they can be broken is one line.

A config.json, index, manifest or input line may be malformed JSON, not UTF-8, or nested
thousands deep (Python's parser then raises RecursionError): `read_json`/`parse_json`
turn each into the caller's error type with a message naming the file; `read_json_or`
is for files whose absence or damage only means "start over" (resume state, caches).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kimi_trt.errors import UserError


def parse_json(data: bytes | str, where: str, error: type[UserError] = UserError) -> Any:
    """JSON from untrusted bytes (UTF-8 only) or text; one-line `error` naming `where`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise error(f"{where}: malformed JSON (nested too deeply)") from None


def read_json(path: Path, error: type[UserError] = UserError) -> Any:
    """The parsed JSON file at `path`; unreadable or broken is one-line `error`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    return parse_json(data, str(path), error)


def read_json_or(path: Path, default: Any) -> Any:
    """The parsed JSON file at `path`, or `default` when it is absent or broken."""
    try:
        return read_json(path)
    except UserError:
        return default
