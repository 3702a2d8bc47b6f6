"""transformers' DeepseekV3ForCausalLM loaded with a checkpoint's dequantised weights.

This is the independent numerical reference (docs/design.md testing tier 2): it reads the HF
checkpoint directly with safetensors (not through our converter), dequantises block-FP8
with `fp8.dequantize_block`, and builds transformers' own model, so a bug in our weight
table or executor cannot hide in the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from kimi_trt.config import ModelConfig, load_model_config
from kimi_trt.convert.fp8 import FP8_DTYPE, dequantize_block
from kimi_trt.torch_bridge import to_numpy, to_torch, torch_dtype


def transformers_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """DeepseekV3Config with the same values (model_type deepseek_v3: kimi_k2 is not registered)."""
    from transformers import DeepseekV3Config

    d = cfg.to_hf_dict()
    d.pop("quantization_config", None)
    d["model_type"] = "deepseek_v3"
    if cfg.rope_scaling is not None:
        rs = dict(d["rope_scaling"])
        rs["rope_type"] = "yarn"
        rs["rope_theta"] = cfg.rope_theta
        d["rope_parameters"] = rs
        d["rope_scaling"] = rs
    c = DeepseekV3Config(**d)
    c.torch_dtype = dtype
    c._attn_implementation = "eager"
    return c


def load_dequantized_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """HF tensor name -> float32 tensor, FP8 weights multiplied out with their block scales."""
    ckpt = Path(ckpt)
    cfg = load_model_config(ckpt)
    index = ckpt / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(ckpt / f), framework="pt") as sf:
            for k in sf.keys():
                raw[k] = sf.get_tensor(k)
    out = {}
    for k, v in raw.items():
        if k.endswith("weight_scale_inv") or k.endswith("rotary_emb.inv_freq"):
            continue
        if v.dtype == torch_dtype(FP8_DTYPE):
            scale = raw[k[: -len("weight")] + "weight_scale_inv"]
            v = to_torch(dequantize_block(to_numpy(v), to_numpy(scale), cfg.weight_block_size))
        out[k] = v.to(torch.float32)
    return out


def load_reference_model(ckpt: Path, dtype: torch.dtype = torch.float32):
    """transformers DeepseekV3ForCausalLM with the checkpoint's dequantised weights, in eval mode."""
    return reference_model(load_model_config(ckpt), load_dequantized_state(ckpt), dtype)


def reference_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
):
    """transformers DeepseekV3ForCausalLM of `cfg` holding `state` (HF tensor name -> float
    tensor, per-expert names as in the checkpoint), in eval mode. `state` is consumed."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(transformers_config(cfg, dtype)).to(dtype).eval()
    fused: dict[str, torch.Tensor] = {}
    for layer in cfg.moe_layers:
        p = f"model.layers.{layer}.mlp.experts"
        e = range(cfg.n_routed_experts)
        gate_up = [
            torch.cat(
                [state.pop(f"{p}.{x}.gate_proj.weight"), state.pop(f"{p}.{x}.up_proj.weight")]
            )
            for x in e
        ]
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{x}.down_proj.weight") for x in e])
    state.update(fused)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in state.items()}, strict=False
    )
    missing = [
        m
        for m in missing
        if not m.endswith("inv_freq") and not (cfg.tie_word_embeddings and m == "lm_head.weight")
    ]
    if missing or unexpected:
        raise AssertionError(
            f"reference load mismatch: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    return model
