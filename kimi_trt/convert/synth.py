"""Synthetic Hugging Face checkpoints laid out exactly like Kimi-K2's, for tests and benchmarks.

Every tensor of `hf_layout.hf_tensors(cfg)` is generated from its own generator seeded by
(seed, tensor name), so output is deterministic and independent of file order. Files are
written one decoder layer per shard (as Kimi-K2 does) through the streaming writer: memory
is bounded by one tensor however large the checkpoint.

FP8 weights are produced directly in the e4m3 domain (normal bytes times a per-block scale
that varies +-50%), which is fast for `k2-shapes` and exercises real per-block scales. Each
weight is scaled ~1/sqrt(fan_in) so a forward pass gives finite, non-degenerate logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kimi_trt.config import ModelConfig, model_config_from_dict
from kimi_trt.convert.fp8 import FP8_DTYPE, FP8_MAX
from kimi_trt.convert.hf_layout import HFTensor, hf_tensors
from kimi_trt.convert.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from kimi_trt.errors import ConfigError, UserError
from kimi_trt.output_dirs import prepare_output_dir, write_json_atomic
from kimi_trt.torch_bridge import to_numpy, torch_dtype

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_CONFIG = ASSETS / "kimi-k2-instruct.config.json"
# The packaged 1024 + 256 vocabulary; copied into checkpoints whose vocab_size matches it.
SMALL_VOCAB_DIR = ASSETS / "small-vocab"

# YaRN 4x over 512 positions (2048 in all), in Kimi-K2's config.json form. The one
# definition for the tiny presets and the shipped tiny model (tinymodel/prepare.py's
# TINY_SHAPES), which use the same rope. Changing it changes the trained model's rope too:
# tests/test_tiny_model.py holds it to kimi_trt/assets/tiny-kimi/config.json.
TINY_ROPE_SCALING: dict[str, Any] = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

_TINY: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,  # kv_a rows = 128 + 64 = 192: a partial FP8 block
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "vocab_size": 1280,
    "bos_token_id": 1024,
    "eos_token_id": 1025,
    "max_position_embeddings": 2048,
    "rope_scaling": TINY_ROPE_SCALING,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    # DeepSeek-V3-style grouped routing and several dense layers.
    "tiny-groups": {
        **_TINY,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
    },
    "small": {
        **_TINY,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 32,
        "num_experts_per_tok": 4,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "v_head_dim": 128,
        "vocab_size": 8448,
        "bos_token_id": 8192,
        "eos_token_id": 8193,
    },
    "k2-shapes": {"num_hidden_layers": 3, "n_routed_experts": 32},
}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> config.json fields (VALUE as JSON, else as a string)."""
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def preset_config(
    preset: str,
    layers: int | None = None,
    experts: int | None = None,
    vocab: int | None = None,
    fp8: bool = True,
    overrides: dict[str, Any] | None = None,
) -> ModelConfig:
    """Kimi-K2's real config.json with a preset's (and the caller's) fields replaced."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    raw = json.loads(REFERENCE_CONFIG.read_text())
    raw.update(PRESETS[preset])
    for key, value in (
        ("num_hidden_layers", layers),
        ("n_routed_experts", experts),
        ("vocab_size", vocab),
    ):
        if value is not None:
            raw[key] = value
    raw.update(overrides or {})
    if not fp8:
        raw.pop("quantization_config", None)
    if raw["num_experts_per_tok"] > raw["n_routed_experts"]:
        raw["num_experts_per_tok"] = raw["n_routed_experts"]
    return model_config_from_dict(raw, src=f"preset {preset}")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def synth_tensor(t: HFTensor, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The value of one tensor (deterministic in seed and name)."""
    g = _generator(seed, t.name)
    if t.is_scale:
        # weight_scale_inv: target std of the dequantised weight / typical |fp8| value.
        std = 1.0 / math.sqrt(t.shape[-1] * cfg.weight_block_size[1])
        jitter = 0.5 + torch.rand(t.shape, generator=g)
        return (jitter * std / 64.0).to(torch.float32)
    if t.name.endswith("e_score_correction_bias"):
        return (torch.rand(t.shape, generator=g) - 0.5) * 0.2
    if t.cls == "norms":
        return (1.0 + 0.1 * torch.randn(t.shape, generator=g)).to(torch_dtype(t.dtype))
    dtype = torch_dtype(t.dtype)
    if t.dtype == FP8_DTYPE:
        return (torch.randn(t.shape, generator=g) * 64.0).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    if t.cls == "embeddings":
        return torch.randn(t.shape, generator=g).to(dtype)
    gain = 2.0 if t.cls == "router" else 1.0
    return (torch.randn(t.shape, generator=g) * gain / math.sqrt(t.shape[-1])).to(dtype)


def shard_plan(cfg: ModelConfig) -> list[list[HFTensor]]:
    """Tensors grouped one decoder layer per file; embeddings with the first, head with the last."""
    by_layer: dict[int | None, list[HFTensor]] = {}
    for t in hf_tensors(cfg):
        by_layer.setdefault(t.layer, []).append(t)
    files = [by_layer[i] for i in range(cfg.num_hidden_layers)]
    head = by_layer.get(None, [])
    files[0] = [t for t in head if t.cls == "embeddings"] + files[0]
    files[-1] = files[-1] + [t for t in head if t.cls != "embeddings"]
    return files


def _copy_matching_tokenizer(cfg: ModelConfig, out: Path) -> None:
    """Give the checkpoint tokenizer files when the small vocabulary fits its vocab_size, so
    text prompts and chat work on synthetic models as on the real one."""
    base = sum(1 for line in (SMALL_VOCAB_DIR / "tiktoken.model").read_text().splitlines() if line)
    if cfg.vocab_size != base + 256 or cfg.bos_token_id != base:
        return
    for f in SMALL_VOCAB_DIR.iterdir():
        shutil.copyfile(f, out / f.name)


def write_synthetic_checkpoint(
    cfg: ModelConfig, out: str | Path, seed: int = 0, progress: bool = True
) -> dict[str, int]:
    """Write config.json, sharded safetensors and model.safetensors.index.json into `out`."""
    out = prepare_output_dir(Path(out))
    files = shard_plan(cfg)
    n = len(files)
    weight_map: dict[str, str] = {}
    total = sum(t.nbytes for f in files for t in f)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)
    for i, tensors in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
        with StreamingSafetensorsWriter(out / fname, specs, metadata={"format": "pt"}) as w:
            for t in tensors:
                w.write(t.name, to_numpy(synth_tensor(t, cfg, seed)))
                weight_map[t.name] = fname
                bar.update(t.nbytes)
    bar.close()
    _copy_matching_tokenizer(cfg, out)
    write_json_atomic(out / "config.json", cfg.to_hf_dict())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json_atomic(out / "model.safetensors.index.json", index)  # last: marks it complete
    return {"tensors": len(weight_map), "bytes": total, "files": n}
