"""manifest.json, the resume state, and `--verify` for a per-rank checkpoint directory.

The resume state (`.convert-state.json`) records each finished rank file: its checksum
(`kimi_trt.checksum`, XXH3-128, hashed while writing), sizes, bytes per class and its
requantisation statistics. A rerun reuses a rank file only if the state lists it with the
same config hash and its bytes hash to the recorded checksum. The manifest is built from
the state alone, so it is identical whether ranks were converted now or reused; it is
written last, and its presence marks the directory complete. It names its checksum
algorithm; `verify_dir` re-hashes every file with it, a few files at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import kimi_trt
from kimi_trt.checksum import ALGORITHM, file_matches, hash_file, manifest_algorithm
from kimi_trt.convert.formats import ErrorStats
from kimi_trt.convert.hf_layout import TENSOR_CLASSES
from kimi_trt.convert.rank_checkpoint import (
    CONFIG_NAME,
    MANIFEST_NAME,
    RankCheckpointConfig,
    check_rank_header,
    rank_file_name,
    read_rank_config,
)
from kimi_trt.errors import CheckpointError
from kimi_trt.json_files import read_json, read_json_or
from kimi_trt.output_dirs import write_json_atomic

STATE_NAME = ".convert-state.json"
MANIFEST_KIND = "kimi_trt.per_rank_checkpoint"
MANIFEST_VERSION = 2  # 2: checksum_algorithm + digests keyed by algorithm (1: sha256 only)
VERIFY_THREADS = 4  # files hashed at once by verify_dir (reads and hashing release the GIL)


class ResumeState:
    """Thread-safe record of finished rank files, persisted after every rank."""

    def __init__(self, out: Path, config_hash: str):
        self.path = out / STATE_NAME
        self.config_hash = config_hash
        self.ranks: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        raw = read_json_or(self.path, {})  # unreadable state: every rank is converted again
        ranks = raw.get("ranks") if isinstance(raw, dict) else None
        if isinstance(ranks, dict) and raw.get("config_hash") == config_hash:
            self.ranks = dict(ranks)

    def record(self, rank: int, entry: dict[str, Any]) -> None:
        with self._lock:
            self.ranks[str(rank)] = entry
            write_json_atomic(self.path, {"config_hash": self.config_hash, "ranks": self.ranks})

    def reusable(self, out: Path, rank: int) -> dict[str, Any] | None:
        """The recorded entry if rank{rank}.safetensors exists and its checksum matches."""
        entry = self.ranks.get(str(rank))
        if entry is None or not file_matches(out / rank_file_name(rank), entry, ALGORITHM):
            return None
        return entry


def _merge_errors(
    entries: list[dict[str, Any]], key: str, formats: dict[str, str] | None
) -> dict[str, Any]:
    merged: dict[str, ErrorStats] = {}
    for entry in entries:
        for name, state in entry[key].items():
            merged.setdefault(name, ErrorStats()).merge(ErrorStats.from_state(state))
    out = {}
    for name in sorted(merged):
        info = merged[name].to_json()
        if formats is not None:
            info = {"format": formats.get(name, "asis"), **info}
        out[name] = {**info, "exact": info["max_rel_err"] == 0.0}
    return out


def build_manifest(
    out: Path,
    cfg: RankCheckpointConfig,
    entries: list[dict[str, Any]],
    source: dict[str, Any],
    requantised: dict[str, str] | None = None,
) -> dict[str, Any]:
    """manifest.json content from the per-rank state entries (in rank order).

    Errors are the ones measured while writing (`formats.ErrorStats`): a class is `exact`
    only if every written piece decoded to its source value. `requantised` names the
    fp8_block targets whose blocks did not line up (`units.requantisation_plan`)."""
    formats = cfg.formats
    by_format = {c: formats.for_class(c) for c in ("attention", "dense_mlp", "experts")}
    by_format |= {"shared_expert": formats.for_class("shared_expert")}
    by_format |= {"embeddings": formats.embeddings, "lm_head": formats.embeddings}
    files: dict[str, Any] = {
        CONFIG_NAME: {
            ALGORITHM: hash_file(out / CONFIG_NAME),
            "bytes": (out / CONFIG_NAME).stat().st_size,
        }
    }
    totals = dict.fromkeys(TENSOR_CLASSES, 0)
    for rank, entry in enumerate(entries):
        files[rank_file_name(rank)] = {
            k: entry[k] for k in (ALGORITHM, "bytes", "tensors", "tensor_bytes", "bytes_by_class")
        }
        for cls, n in entry["bytes_by_class"].items():
            totals[cls] = totals.get(cls, 0) + n
    return {
        "kind": MANIFEST_KIND,
        "format_version": MANIFEST_VERSION,
        "checksum_algorithm": ALGORITHM,
        "tool": "kimi_trt",
        "tool_version": kimi_trt.__version__,
        "config_hash": cfg.config_hash,
        "model_config_hash": cfg.model.config_hash(),
        "world_size": cfg.world_size,
        "mapping": cfg.mapping.to_trtllm_dict(),
        "weight_formats": formats.model_dump(mode="json"),
        "files": files,
        "bytes_by_class": totals,
        "requant_error": _merge_errors(entries, "stats", by_format),
        "derived_error": _merge_errors(entries, "derived", None),
        "requantised": dict(requantised or {}),
        "source": source,
    }


def manifest_files(path: Path, manifest: Any) -> dict[str, dict[str, Any]]:
    """A manifest's `files` map (per-rank checkpoint or engine dir), each entry checked:
    a relative name inside the directory, integer `bytes`, a string digest."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: malformed manifest (no 'files' object)")
    algorithm = manifest_algorithm(manifest)
    for name, info in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{path}: file {name!r} lies outside the directory")
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int)
        if not (ok and isinstance(info.get(algorithm), str)):
            raise CheckpointError(
                f"{path}: malformed entry for {name} (expected 'bytes' and '{algorithm}')"
            )
    return files


def read_manifest(out: Path) -> dict[str, Any]:
    p = out / MANIFEST_NAME
    if not p.is_file():
        raise CheckpointError(f"{p}: no manifest.json: the directory is not a complete conversion")
    data = read_json(p, CheckpointError)
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise CheckpointError(f"{p}: not a kimi_trt per-rank checkpoint manifest")
    manifest_files(p, data)
    return data


def verify_dir(out: str | Path, progress=None) -> dict[str, Any]:
    """Re-check a converted directory: manifest, config, every file's checksum and header."""
    out = Path(out)
    manifest = read_manifest(out)
    cfg = read_rank_config(out)
    if manifest.get("config_hash") != cfg.config_hash:
        raise CheckpointError(
            f"{out / MANIFEST_NAME}: config_hash {manifest.get('config_hash')} does not match "
            f"config.json's {cfg.config_hash}"
        )
    algorithm = manifest_algorithm(manifest)
    for name, info in manifest["files"].items():
        path = out / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in manifest.json but missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, manifest.json says {info['bytes']}"
            )

    def check(item: tuple[str, dict[str, Any]]) -> None:
        name, info = item
        if hash_file(out / name, algorithm) != info[algorithm]:
            raise CheckpointError(
                f"{out / name}: {algorithm} checksum does not match manifest.json (corrupted)"
            )
        if progress is not None:
            progress(info["bytes"])

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        list(pool.map(check, manifest["files"].items()))
    for rank in range(cfg.world_size):
        if rank_file_name(rank) not in manifest["files"]:
            raise CheckpointError(f"{out / MANIFEST_NAME}: no entry for {rank_file_name(rank)}")
        check_rank_header(cfg, rank)
    return manifest
