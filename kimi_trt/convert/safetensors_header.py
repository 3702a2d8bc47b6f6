"""Full validation of a safetensors header before any byte of tensor data is trusted.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor
names to `{dtype, shape, data_offsets}`, then the data section. Everything downstream
reads data at the header's offsets - the converter with `pread`, the rank writer copying
byte ranges verbatim, the runtime through the safetensors library - so a header that lies
(offsets overlapping, reversed, past the end of the file, or spanning fewer bytes than the
shape needs) would become wrong weights or a rank file the library rejects. This module
checks everything the format requires, the rules the safetensors library enforces on load:
every entry an object with exactly a known dtype, a shape of non-negative integers and
`[start, end]` offsets; sorted by start, the entries tile the data section exactly; each
spans shape x dtype-size bytes. The first violation becomes one `CheckpointError` naming
the file and the tensor. Reading a header costs one `pread` of a few KB; no torch import.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_trt.errors import CheckpointError

# Bytes per element of each safetensors dtype (the format's dtype names).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The safetensors library refuses larger headers (its MAX_HEADER_SIZE); so do we, before
# reading one.
MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor: dtype name, shape, and its byte range [start, end) in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors by name, the data section's file offset, metadata."""

    path: Path
    data_start: int  # file offset of the data section (8 + header length)
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]


def require_regular_file(path: Path, what: str = "file") -> os.stat_result:
    """stat() `path` (following links) and refuse anything but a regular file: a FIFO would
    block the reader forever, a device or directory is never a checkpoint."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{path}: {what} is {kind}")
    return st


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _parse_json(path: Path, blob: bytes) -> dict[str, Any]:
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an "
            "object of tensors)"
        )
    return header


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: Path, name: str, info: Any) -> HeaderEntry:
    """One header entry, checked alone: keys, dtype, shape, offsets and their span."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(
            f"{where}: header entry must have exactly dtype, shape, data_offsets (got {got})"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where}: unknown safetensors dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise CheckpointError(
            f"{where}: shape must be a list of non-negative integers, got {shape!r}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))):
        raise CheckpointError(
            f"{where}: data_offsets must be [start, end] non-negative integers, got {offsets!r}"
        )
    start, end = offsets
    if start > end:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] end before they start")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != need:
        raise CheckpointError(
            f"{where}: data_offsets [{start}, {end}] span {end - start} bytes but shape "
            f"{shape} of {dtype} needs {need}"
        )
    return HeaderEntry(name, dtype, tuple(shape), start, end)


def _check_tiling(path: Path, entries: list[HeaderEntry], data_bytes: int) -> None:
    """Sorted by offset, the tensors must cover [0, data_bytes) exactly once."""
    pos, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < pos:
            raise CheckpointError(
                f"{path}: tensor {e.name} (bytes [{e.start}, {e.end})) overlaps tensor "
                f"{prev.name} (bytes [{prev.start}, {prev.end}))"
            )
        if e.start > pos:
            raise CheckpointError(
                f"{path}: tensor {e.name} starts at byte {e.start} of the data section, "
                f"leaving bytes [{pos}, {e.start}) that belong to no tensor"
            )
        if e.end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {e.name} ends at byte {e.end} of the data section "
                f"but the file holds {data_bytes} data bytes"
            )
        pos, prev = e.end, e
    if pos != data_bytes:
        raise CheckpointError(
            f"{path}: {data_bytes - pos} bytes after the last tensor's data (the header "
            f"describes {pos} data bytes, the file holds {data_bytes})"
        )


def _metadata(path: Path, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(
            f"{path}: safetensors __metadata__ must be an object of strings, got {raw!r:.80}"
        )
    return raw


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and fully validate the header of the safetensors file `path`."""
    path = Path(path)
    st = require_regular_file(path)
    size = st.st_size
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror})") from None
    try:
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (claims {n} bytes, limit {MAX_HEADER_BYTES})"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated: header of {n} bytes but the file has {size} bytes"
            )
        blob = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    header = _parse_json(path, blob)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = [_entry(path, name, info) for name, info in header.items()]
    _check_tiling(path, entries, size - 8 - n)
    return SafetensorsHeader(path, 8 + n, {e.name: e for e in entries}, metadata)
