"""The engine dir `kimi-trt build` leaves: recognising and describing it (for `kimi-trt inspect`).

Layout (written by kimi_trt.build_stages):
    config.json          backend trtllm: TensorRT-LLM's engine config (version,
                         pretrained_config, build_config); backend torch: the per-rank
                         checkpoint's config.json
    rank{N}.engine       backend trtllm, one per rank
    rank{N}.safetensors  backend torch, the per-rank checkpoint (hard links)
    tiktoken.model, tokenizer_config.json, ...   copied from tokenizer_dir
    manifest.json        kind kimi_trt.engine_dir: backend, layout, formats, limits and the
                         sha256 of every file above; written last (absent: incomplete)
    checkpoint/          the converter's per-rank checkpoint (kept for resume/rebuilds)
    .kimi-build/         the build's stage state and plan
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ENGINE_FORMAT = "kimi_trt.engine_dir"
MANIFEST = "manifest.json"
_ENGINE_FILE = re.compile(r"rank(\d+)\.engine")


def read_engine_manifest(path: Path) -> dict[str, Any] | None:
    """The engine manifest of `path`, or None if it has none (or another kind of manifest)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("kind") == ENGINE_FORMAT else None


def is_engine_dir(path: Path) -> bool:
    path = Path(path)
    return read_engine_manifest(path) is not None or any(
        _ENGINE_FILE.fullmatch(p.name) for p in path.glob("rank*.engine")
    )


def _engines(path: Path) -> list[dict[str, Any]]:
    found = sorted(
        (int(m.group(1)), p)
        for p in path.glob("rank*.engine")
        if (m := _ENGINE_FILE.fullmatch(p.name))
    )
    return [{"file": p.name, "bytes": p.stat().st_size} for _, p in found]


def describe_engine_dir(path: Path) -> dict[str, Any]:
    """Backend, layout, formats, limits, files; per-rank tensor bytes for torch engine dirs."""
    path = Path(path)
    m = read_engine_manifest(path) or {}
    info: dict[str, Any] = {
        "kind": "engine_dir",
        "path": str(path),
        "complete": bool(m),
        "backend": m.get("backend", "trtllm"),
        "gpu": m.get("gpu"),
        "world_size": m.get("world_size"),
        "weight_formats": m.get("weight_formats"),
        "limits": m.get("limits"),
        "kv_cache_dtype": m.get("kv_cache_dtype"),
        "tokenizer_files": m.get("tokenizer_files", []),
        "build_config_hash": m.get("build_config_hash"),
    }
    if info["backend"] == "torch":
        from kimi_trt.inspect import describe_rank_checkpoint

        ckpt = describe_rank_checkpoint(path)
        info.update(
            world_size=ckpt["world_size"],
            bytes=ckpt["bytes"],
            bytes_by_class=ckpt["bytes_by_class"],
            ranks=ckpt["ranks"],
        )
    else:
        engines = _engines(path)
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        mapping = cfg.get("pretrained_config", {}).get("mapping", {})
        info.update(
            world_size=info["world_size"] or mapping.get("world_size"),
            trtllm_version=cfg.get("version"),
            bytes=sum(e["bytes"] for e in engines),
            engines=engines,
        )
    return info
