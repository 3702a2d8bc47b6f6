"""`kimi-trt inspect PATH`: describe an HF checkpoint, a per-rank checkpoint or an engine dir.

Only safetensors headers are read (no tensor data), so inspecting the 1 TB checkpoint
takes seconds. `describe` returns plain data (for --json); `render` formats it for people.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kimi_trt.config import load_model_config
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.engine_dir import ENGINE_FILE, is_engine_dir, read_engine_manifest
from kimi_trt.errors import CheckpointError, ConfigError

_ST_BYTES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape} from a safetensors file's header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: {
                    "dtype": str(f.get_slice(k).get_dtype()),
                    "shape": list(f.get_slice(k).get_shape()),
                }
                for k in f.keys()
            }
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _nbytes(info: dict[str, Any]) -> int:
    return math.prod(info["shape"]) * _ST_BYTES.get(info["dtype"], 0)


def describe_hf(path: Path) -> dict[str, Any]:
    cfg = load_model_config(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    tensors: dict[str, dict[str, Any]] = {}
    for f in files:
        tensors.update(safetensors_header(path / f))
    cls_of = {t.name: t.cls for t in hf_tensors(cfg)}
    by_class: dict[str, int] = defaultdict(int)
    for name, info in tensors.items():
        by_class[cls_of.get(name, "other")] += _nbytes(info)
    dtypes = Counter(info["dtype"] for info in tensors.values())
    fp8_blocks = sum(
        math.prod(i["shape"]) for n, i in tensors.items() if n.endswith("weight_scale_inv")
    )
    expected = set(cls_of)
    return {
        "kind": "hf_checkpoint",
        "path": str(path),
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layers),
        "hidden_size": cfg.hidden_size,
        "experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "vocab_size": cfg.vocab_size,
        "weight_block_size": list(cfg.weight_block_size) if cfg.weight_block_size else None,
        "files": len(files),
        "tensors": len(tensors),
        "dtypes": dict(dtypes),
        "bytes": sum(_nbytes(i) for i in tensors.values()),
        "bytes_by_class": dict(sorted(by_class.items())),
        "fp8_blocks": fp8_blocks,
        "missing_tensors": sorted(expected - set(tensors))[:20],
        "unknown_tensors": sorted(set(tensors) - expected)[:20],
    }


def describe_rank_checkpoint(path: Path) -> dict[str, Any]:
    """A per-rank checkpoint: layout, formats, and bytes per rank and tensor class."""
    from kimi_trt.checksum import manifest_algorithm
    from kimi_trt.convert.rank_checkpoint import MANIFEST_NAME, read_rank_config
    from kimi_trt.convert.weight_table import rank_tensor_specs

    cfg = read_rank_config(path)
    manifest_path = path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    files = manifest.get("files", {})
    algorithm = manifest_algorithm(manifest)
    m, totals, ranks = cfg.mapping, defaultdict(int), []
    for rank in range(cfg.world_size):
        f = cfg.rank_file(rank)
        if not f.is_file():
            ranks.append({"file": f.name, "missing": True})
            continue
        cls_of = {t.name: t.cls for t in rank_tensor_specs(cfg.model, m, cfg.formats, rank)}
        by_class: dict[str, int] = defaultdict(int)
        header = safetensors_header(f)
        for name, info in header.items():
            by_class[cls_of.get(name, "other")] += _nbytes(info)
            totals[cls_of.get(name, "other")] += _nbytes(info)
        ranks.append(
            {
                "file": f.name,
                "bytes": f.stat().st_size,
                "tensors": len(header),
                "checksum": f"{algorithm}:{files.get(f.name, {}).get(algorithm, '')[:16]}",
                "bytes_by_class": dict(sorted(by_class.items())),
            }
        )
    return {
        "kind": "per_rank_checkpoint",
        "path": str(path),
        "complete": bool(manifest),
        "config_hash": cfg.config_hash,
        "world_size": cfg.world_size,
        "tp": m.tp_size,
        "ep": m.moe_ep_size,
        "moe_tp": m.moe_tp_size,
        "attention_dp": m.attention_dp,
        "weight_formats": cfg.formats.model_dump(mode="json"),
        "layers": cfg.model.num_hidden_layers,
        "experts": cfg.model.n_routed_experts,
        "vocab_size": cfg.model.vocab_size,
        "vocab_size_padded": cfg.vocab_size_padded,
        "bytes": sum(r.get("bytes", 0) for r in ranks),
        "bytes_by_class": dict(sorted(totals.items())),
        "ranks": ranks,
        "requant_error": {
            k: v for k, v in manifest.get("requant_error", {}).items() if not v.get("exact")
        },
    }


def _engines(path: Path) -> list[dict[str, Any]]:
    found = sorted(
        (int(m.group(1)), p)
        for p in path.glob("rank*.engine")
        if (m := ENGINE_FILE.fullmatch(p.name))
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


def describe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    from kimi_trt.convert.rank_checkpoint import is_rank_checkpoint

    if is_engine_dir(path):
        return describe_engine_dir(path)
    if is_rank_checkpoint(path):
        return describe_rank_checkpoint(path)
    if (path / "model.safetensors.index.json").exists() or list(path.glob("model*.safetensors")):
        return describe_hf(path)
    raise ConfigError(f"{path}: not an HF checkpoint, per-rank checkpoint or engine dir")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _render_rank(r: dict[str, Any]) -> str:
    if r.get("missing"):
        return f"  {r['file']:<18} MISSING"
    classes = ", ".join(f"{k} {_gb(v)}" for k, v in r["bytes_by_class"].items())
    return f"  {r['file']:<18} {_gb(r['bytes'])}  {r['tensors']} tensors  {classes}"


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['kind']}: {info['path']}"]
    for key, value in info.items():
        if key in ("kind", "path"):
            continue
        if key.startswith("bytes_by") and isinstance(value, dict):
            lines.append(f"  {key}:")
            lines += [f"    {k:<14} {_gb(v)}" for k, v in value.items()]
        elif key == "bytes":
            lines.append(f"  {key:<18} {_gb(value)}")
        elif key == "ranks":
            lines += [_render_rank(r) for r in value]
        elif isinstance(value, list) and not value:
            continue
        else:
            lines.append(f"  {key:<18} {value}")
    return "\n".join(lines)
