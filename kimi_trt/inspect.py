"""`kimi-trt inspect PATH`: describe an HF checkpoint, a per-rank checkpoint or an engine dir.

Only safetensors headers are read (no tensor data), so inspecting the 1 TB checkpoint
takes seconds. `describe` returns plain data (for --json); `render` formats it for people.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from kimi_trt.config import load_model_config, read_config_json
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.convert.reader import read_weight_map
from kimi_trt.convert.safetensors_header import HeaderEntry, read_safetensors_header
from kimi_trt.engine_dir import ENGINE_FILE, is_engine_dir, read_engine_manifest
from kimi_trt.errors import CheckpointError, ConfigError


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file that may be absent ({}); malformed or not an object is a one-line error."""
    if not path.is_file():
        return {}
    data = read_config_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _headers(paths: list[Path]) -> dict[str, HeaderEntry]:
    """Every tensor of these safetensors files, from their fully validated headers."""
    tensors: dict[str, HeaderEntry] = {}
    for p in paths:
        tensors.update(read_safetensors_header(p).tensors)
    return tensors


def describe_hf(path: Path) -> dict[str, Any]:
    cfg = load_model_config(path)
    files = sorted(set(read_weight_map(path).values()))
    tensors = _headers([path / f for f in files])
    cls_of = {t.name: t.cls for t in hf_tensors(cfg)}
    by_class: dict[str, int] = defaultdict(int)
    for name, info in tensors.items():
        by_class[cls_of.get(name, "other")] += info.nbytes
    dtypes = Counter(info.dtype for info in tensors.values())
    fp8_blocks = sum(
        math.prod(i.shape) for n, i in tensors.items() if n.endswith("weight_scale_inv")
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
        "bytes": sum(i.nbytes for i in tensors.values()),
        "bytes_by_class": dict(sorted(by_class.items())),
        "fp8_blocks": fp8_blocks,
        "missing_tensors": sorted(expected - set(tensors))[:20],
        "unknown_tensors": sorted(set(tensors) - expected)[:20],
    }


def describe_rank_checkpoint(path: Path) -> dict[str, Any]:
    """A per-rank checkpoint: layout, formats, and bytes per rank and tensor class."""
    from kimi_trt.checksum import manifest_algorithm
    from kimi_trt.convert.manifest import manifest_files
    from kimi_trt.convert.rank_checkpoint import MANIFEST_NAME, read_rank_config
    from kimi_trt.convert.weight_table import rank_tensor_specs

    cfg = read_rank_config(path)
    manifest_path = path / MANIFEST_NAME
    manifest = _json_object(manifest_path)  # absent: an incomplete conversion, described too
    files = manifest_files(manifest_path, manifest) if manifest else {}
    requant = manifest.get("requant_error")
    algorithm = manifest_algorithm(manifest)
    m, totals, ranks = cfg.mapping, defaultdict(int), []
    for rank in range(cfg.world_size):
        f = cfg.rank_file(rank)
        if not f.is_file():
            ranks.append({"file": f.name, "missing": True})
            continue
        cls_of = {t.name: t.cls for t in rank_tensor_specs(cfg.model, m, cfg.formats, rank)}
        by_class: dict[str, int] = defaultdict(int)
        header = _headers([f])
        for name, info in header.items():
            by_class[cls_of.get(name, "other")] += info.nbytes
            totals[cls_of.get(name, "other")] += info.nbytes
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
            k: v
            for k, v in (requant if isinstance(requant, dict) else {}).items()
            if isinstance(v, dict) and not v.get("exact")
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
        cfg = _json_object(cfg_path)
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
