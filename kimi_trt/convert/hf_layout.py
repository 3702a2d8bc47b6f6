"""The tensors of a Kimi-K2 / DeepSeek-V3 Hugging Face checkpoint, derived from its config.

One function, `hf_tensors`, lists every tensor the checkpoint must hold (name, dtype,
shape, tensor class), FP8 `weight_scale_inv` tensors included. The synthetic checkpoint
writer produces exactly this list, the converter's reader checks a real checkpoint
against it, and the planner counts parameters from it - so the three cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kimi_trt.config import ModelConfig
from kimi_trt.convert import dtypes
from kimi_trt.convert.fp8 import FP8_DTYPE, scale_shape

# Tensor classes used for byte accounting across synth, converter, planner and inspect.
TENSOR_CLASSES = (
    "attention",
    "dense_mlp",
    "shared_expert",
    "experts",
    "embeddings",
    "lm_head",
    "norms",
    "router",
)


@dataclass(frozen=True)
class HFTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    cls: str  # one of TENSOR_CLASSES
    layer: int | None  # decoder layer index, None for embeddings / final norm / lm_head
    is_scale: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _linear(
    cfg: ModelConfig, name: str, out: int, inp: int, cls: str, layer: int | None
) -> list[HFTensor]:
    """A Linear weight: FP8 + block scales in an FP8 checkpoint, else BF16."""
    if cfg.weight_block_size is None:
        return [HFTensor(name + ".weight", dtypes.bfloat16, (out, inp), cls, layer)]
    return [
        HFTensor(name + ".weight", FP8_DTYPE, (out, inp), cls, layer),
        HFTensor(
            name + ".weight_scale_inv",
            dtypes.float32,
            scale_shape((out, inp), cfg.weight_block_size),
            cls,
            layer,
            is_scale=True,
        ),
    ]


def _norm(name: str, dim: int, layer: int | None) -> HFTensor:
    return HFTensor(name + ".weight", dtypes.bfloat16, (dim,), "norms", layer)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear weight of a decoder layer, by its name relative to
    `model.layers.L.` (routed experts as `mlp.experts.{E}.*`): the one place source shapes
    come from (this listing, the weight table's slices, the planner)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    a = "self_attn."
    shapes: dict[str, tuple[int, int]] = {}
    if cfg.q_lora_rank is None:
        shapes[a + "q_proj"] = (heads * cfg.qk_head_dim, h)
    else:
        shapes[a + "q_a_proj"] = (cfg.q_lora_rank, h)
        shapes[a + "q_b_proj"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    shapes[a + "kv_a_proj_with_mqa"] = (cfg.kv_a_width, h)
    shapes[a + "kv_b_proj"] = (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    shapes[a + "o_proj"] = (h, heads * cfg.v_head_dim)
    for prefix, inter in (
        ("mlp.", cfg.intermediate_size),
        ("mlp.experts.{E}.", cfg.moe_intermediate_size),
        ("mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts),
    ):
        shapes[prefix + "gate_proj"] = (inter, h)
        shapes[prefix + "up_proj"] = (inter, h)
        shapes[prefix + "down_proj"] = (h, inter)
    return shapes


def _linears(
    cfg: ModelConfig, layer: int, shapes: dict[str, tuple[int, int]], names: list[str], cls: str
) -> list[HFTensor]:
    out: list[HFTensor] = []
    for name in names:
        out += _linear(cfg, f"model.layers.{layer}.{name}", *shapes[name], cls, layer)
    return out


def _mlp(prefix: str) -> list[str]:
    return [prefix + p for p in ("gate_proj", "up_proj", "down_proj")]


def layer_tensors(cfg: ModelConfig, i: int) -> list[HFTensor]:
    """Every tensor of decoder layer i (attention, norms, dense MLP or MoE)."""
    p = f"model.layers.{i}"
    h, shapes = cfg.hidden_size, linear_shapes(cfg)
    a = f"{p}.self_attn"
    out = [_norm(f"{p}.input_layernorm", h, i), _norm(f"{p}.post_attention_layernorm", h, i)]
    if cfg.q_lora_rank is None:
        out += _linears(cfg, i, shapes, ["self_attn.q_proj"], "attention")
    else:
        out += _linears(cfg, i, shapes, ["self_attn.q_a_proj"], "attention")
        out.append(_norm(f"{a}.q_a_layernorm", cfg.q_lora_rank, i))
        out += _linears(cfg, i, shapes, ["self_attn.q_b_proj"], "attention")
    out += _linears(cfg, i, shapes, ["self_attn.kv_a_proj_with_mqa"], "attention")
    out.append(_norm(f"{a}.kv_a_layernorm", cfg.kv_lora_rank, i))
    out += _linears(cfg, i, shapes, ["self_attn.kv_b_proj", "self_attn.o_proj"], "attention")
    if cfg.layer_kinds[i] == "dense":
        return out + _linears(cfg, i, shapes, _mlp("mlp."), "dense_mlp")
    e = cfg.n_routed_experts
    out.append(HFTensor(f"{p}.mlp.gate.weight", dtypes.bfloat16, (e, h), "router", i))
    out.append(HFTensor(f"{p}.mlp.gate.e_score_correction_bias", dtypes.float32, (e,), "router", i))
    expert = _mlp("mlp.experts.{E}.")
    for x in range(e):
        for name in expert:
            full = f"{p}.{name.format(E=x)}"
            out += _linear(cfg, full, *shapes[name], "experts", i)
    if cfg.n_shared_experts:
        out += _linears(cfg, i, shapes, _mlp("mlp.shared_experts."), "shared_expert")
    return out


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """All tensors of the checkpoint, in the order Kimi-K2's files hold them."""
    out = [
        HFTensor(
            "model.embed_tokens.weight",
            dtypes.bfloat16,
            (cfg.vocab_size, cfg.hidden_size),
            "embeddings",
            None,
        )
    ]
    for i in range(cfg.num_hidden_layers):
        out += layer_tensors(cfg, i)
    out.append(_norm("model.norm", cfg.hidden_size, None))
    if not cfg.tie_word_embeddings:
        out.append(
            HFTensor(
                "lm_head.weight",
                dtypes.bfloat16,
                (cfg.vocab_size, cfg.hidden_size),
                "lm_head",
                None,
            )
        )
    return out
