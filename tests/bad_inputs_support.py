"""File surgery for the bad-input corpus (tests/test_bad_inputs.py): safetensors headers
rewritten byte by byte, manifests re-sealed, index and config edits."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kimi_trt.checksum import hash_file, manifest_algorithm

LAYER1 = "model-00002-of-00003.safetensors"  # the tiny checkpoint's MoE layer shard
INDEX = "model.safetensors.index.json"


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data section) of a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file with exactly these header bytes (and a chosen length field)."""
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the header as `edit(header)` returns it (any JSON value), data unchanged."""
    header, data = split(path)
    write_raw(path, json.dumps(edit(header)).encode(), data)


def tensors_by_offset(header: dict[str, Any]) -> list[str]:
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def same_size_pair(header: dict[str, Any]) -> tuple[str, str]:
    """Two tensors of equal byte size (for an overlap that passes the per-entry checks)."""
    seen: dict[int, str] = {}
    for name in tensors_by_offset(header):
        start, end = header[name]["data_offsets"]
        if end - start in seen:
            return seen[end - start], name
        seen[end - start] = name
    raise AssertionError("no two tensors of equal size")


def set_entry(name_of: Callable[[dict], str], **fields: Any) -> Callable[[dict], dict]:
    """An `edit_header` edit replacing fields of one entry (None deletes a field)."""

    def edit(h: dict[str, Any]) -> dict[str, Any]:
        entry = h[name_of(h)]
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value(entry) if callable(value) else value
        return h

    return edit


def first(h: dict[str, Any]) -> str:
    return tensors_by_offset(h)[0]


def overlap(h: dict[str, Any]) -> dict[str, Any]:
    a, b = same_size_pair(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h


def deep_json(depth: int = 10_000) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def set_weight_map(ckpt: Path, edit: Callable[[dict], Any]) -> None:
    def change(index: dict) -> dict:
        index["weight_map"] = edit(index["weight_map"])
        return index

    edit_json(ckpt / INDEX, change)


def point_shard(ckpt: Path, target: str) -> None:
    """Every tensor of LAYER1 now listed under shard `target`."""
    set_weight_map(ckpt, lambda wm: {k: target if v == LAYER1 else v for k, v in wm.items()})


def set_config(ckpt: Path, **fields: Any) -> None:
    edit_json(ckpt / "config.json", lambda c: {**c, **fields})


def reseal(out: Path, name: str = "rank0.safetensors") -> None:
    """Record `name`'s current size and checksum in the manifest (a file that matches its
    manifest but is wrong inside, as a buggy writer would leave)."""
    path = out / name

    def change(m: dict) -> dict:
        algorithm = manifest_algorithm(m)
        m["files"][name].update(
            bytes=path.stat().st_size, **{algorithm: hash_file(path, algorithm)}
        )
        return m

    edit_json(out / "manifest.json", change)


def flip_byte(path: Path, offset_from_end: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        b = f.read(1)
        f.seek(-offset_from_end, 2)
        f.write(bytes([b[0] ^ 0x10]))
