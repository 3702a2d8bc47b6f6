"""The tiny model's `export` step (CPU): trained weights -> a checkpoint laid out exactly like
Kimi-K2's (block-FP8 + scales, BF16 embeddings/norms/router, fp32 bias, tokenizer files),
then proved by loading it with the independent reference loader and comparing with the
float model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kimi_trt.config import ModelConfig, load_model_config
from kimi_trt.convert.fp8 import FP8_DTYPE, quantize_block
from kimi_trt.convert.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from kimi_trt.convert.synth import shard_plan
from kimi_trt.errors import CheckpointError
from kimi_trt.testing.hf_reference import (
    load_dequantized_state,
    load_reference_model,
    transformers_config,
)
from kimi_trt.tinymodel.prepare import copy_tokenizer_files
from kimi_trt.torch_bridge import to_numpy, torch_dtype


def read_trained_state(weights_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(weights_dir).glob("weights-*.safetensors"))
    if not files:
        raise CheckpointError(f"{weights_dir}: no weights-*.safetensors (the train step's output)")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k).float()
    return state


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of train outputs of one lineage (one continued from the other):
    a later phase can trade one skill for another (phase 5 copied held-out names better and
    let catalogue names run on), and the average may keep most of both; which candidate
    ships is chosen on the development set (`train_tiny_model.py score`)."""
    first = states[0]
    for other in states[1:]:
        for name in sorted(set(first) | set(other)):
            if name not in first or name not in other or other[name].shape != first[name].shape:
                raise CheckpointError(
                    f"export --weights: tensor {name} is absent from one folder or shaped "
                    "differently (average only train outputs of the same model)"
                )
    return {k: sum(s[k] for s in states) / len(states) for k in first}


def hf_named_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> Kimi-K2's per-expert checkpoint names.

    transformers 5 keeps each layer's experts fused (gate_up_proj [E, 2I, H] with gate rows
    first, down_proj [E, H, I]); older releases already use per-expert modules."""
    out = {k: v for k, v in state.items() if ".mlp.experts.gate_up_proj" not in k}
    inter = cfg.moe_intermediate_size
    for layer in cfg.moe_layers:
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.gate_up_proj" not in state:
            continue
        gate_up, down = state[f"{p}.gate_up_proj"], out.pop(f"{p}.down_proj")
        for e in range(cfg.n_routed_experts):
            out[f"{p}.{e}.gate_proj.weight"] = gate_up[e, :inter]
            out[f"{p}.{e}.up_proj.weight"] = gate_up[e, inter:]
            out[f"{p}.{e}.down_proj.weight"] = down[e]
    return out


def _tensor_values(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Callable:
    """name -> stored value (numpy): block-FP8 (+ its scale) for Linear weights, else cast."""
    quantized: dict[str, np.ndarray] = {}

    def value(t) -> np.ndarray:
        if t.is_scale:
            return quantized.pop(t.name)
        if t.name not in state:
            raise CheckpointError(f"trained weights lack {t.name}")
        w = state[t.name]
        if tuple(w.shape) != t.shape:
            raise CheckpointError(f"{t.name}: trained shape {tuple(w.shape)}, expected {t.shape}")
        if t.dtype == FP8_DTYPE:
            q, scale = quantize_block(to_numpy(w.float()), cfg.weight_block_size)
            quantized[t.name[: -len("weight")] + "weight_scale_inv"] = scale
            return q
        return to_numpy(w.to(torch_dtype(t.dtype)))

    return value


def write_kimi_checkpoint(
    state: dict[str, torch.Tensor], cfg: ModelConfig, vocab: Path, out: Path
) -> int:
    """Kimi-K2's layout: one file per decoder layer, index, config.json, tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model-*.safetensors"):
        stale.unlink()
    value = _tensor_values(hf_named_state(state, cfg), cfg)
    files = shard_plan(cfg)
    weight_map, total = {}, 0
    for i, tensors in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
        with StreamingSafetensorsWriter(out / name, specs, metadata={"format": "pt"}) as w:
            for t in tensors:
                w.write(t.name, value(t))
                weight_map[t.name] = name
                total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    copy_tokenizer_files(vocab, out)
    return total


def fused_experts_state(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Per-expert names (older transformers' in-memory layout) -> this transformers' fused one."""
    out = dict(state)
    for layer in cfg.moe_layers:
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in out:
            continue
        experts = range(cfg.n_routed_experts)
        out[f"{p}.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [out.pop(f"{p}.{e}.gate_proj.weight"), out.pop(f"{p}.{e}.up_proj.weight")]
                )
                for e in experts
            ]
        )
        out[f"{p}.down_proj"] = torch.stack([out.pop(f"{p}.{e}.down_proj.weight") for e in experts])
    return out


def float_model(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """The trained model in float32 exactly as training left it (the export's reference)."""
    from transformers import DeepseekV3ForCausalLM

    state = fused_experts_state(state, cfg)
    model = DeepseekV3ForCausalLM(transformers_config(cfg)).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise CheckpointError(
            f"trained weights do not fit the config: missing={missing[:3]} unexpected={unexpected[:3]}"
        )
    return model


def weight_errors(ckpt: Path, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor relative error (Frobenius) of the checkpoint's dequantised weights vs the
    trained ones, matched by HF name: block-FP8 gives a few percent; a tensor written to
    the wrong name or transposed gives ~1 or more."""
    cfg = load_model_config(ckpt)
    trained = hf_named_state(state, cfg)
    stored = load_dequantized_state(ckpt)
    missing = sorted(set(trained) - set(stored))
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks trained tensors {missing[:3]}")
    return {
        k: float((stored[k] - v).norm() / v.norm().clamp(min=1e-12))
        for k, v in trained.items()
        if not k.endswith("inv_freq")
    }


def compare_with_float(
    ckpt: Path, state: dict[str, torch.Tensor], eval_path: Path, stride: int = 7
) -> dict:
    """How close the exported checkpoint is to the trained float model: the worst per-tensor
    weight error, and on the eval prompts the relative RMS logit error and how often both
    models pick the same next token."""
    cfg = load_model_config(ckpt)
    errors = weight_errors(ckpt, state)
    ref, exported = float_model(state, cfg), load_reference_model(ckpt)
    z = np.load(eval_path)
    tokens, offsets = z["tokens"], z["offsets"]
    diff2, ref2, agree, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(offsets) - 1, stride):
            ids = torch.from_numpy(tokens[offsets[i] : offsets[i + 1]][None])
            a, b = ref(input_ids=ids).logits[0], exported(input_ids=ids).logits[0]
            diff2 += float((a - b).square().sum())
            ref2 += float(a.square().sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    worst = max(errors, key=errors.get)
    return {
        "max_weight_error": errors[worst],
        "max_weight_error_tensor": worst,
        "rel_rms_logit_error": (diff2 / ref2) ** 0.5,
        "argmax_agreement": agree / total,
        "positions": total,
    }


def export(args) -> None:
    """Write the checkpoint into args.out and report how close it is to the float model."""
    data, out = Path(args.data), Path(args.out)
    cfg = load_model_config(data)
    state = average_states([read_trained_state(Path(w)) for w in args.weights])
    total = write_kimi_checkpoint(state, cfg, data / "vocab", out)
    check = compare_with_float(out, state, data / "eval.npz")
    check["checkpoint_bytes"] = total
    print(json.dumps(check))
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(check, indent=1))
    if check["max_weight_error"] > 0.06 or check["rel_rms_logit_error"] > 0.25:
        raise CheckpointError(f"{out}: exported model disagrees with the trained one: {check}")
