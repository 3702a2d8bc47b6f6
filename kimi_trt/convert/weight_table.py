"""THE weight table: every HF tensor -> per-rank target, shard rule and transform.

docs/design.md principle 1. `LAYER_RULES` and `GLOBAL_RULES` are plain data: each `Rule`
names its target (TensorRT-LLM DeepSeek-V2 engine-checkpoint names, see
docs/per-rank-checkpoint.md), its HF source tensors, its tensor class, how it is split
over ranks and which named transform builds it. Everything else is derived from the
table: the per-rank tensor list with dtypes and shapes (`rank_tensor_specs`, used by the
streaming writer for its header and by the planner for its byte counts), the set of HF
tensors the converter consumes (`consumed_sources`) and the tensors it deliberately
ignores (`IGNORED_PATTERNS`).

Shard rules (`Rule.shard`):
  replicate  every rank holds the whole tensor
  rows       dim 0 split over the attention-TP group (attn_tp_size; 1 under attention DP)
  cols       dim 1 split the same way
  vocab      rows split over attn_tp after padding the vocab to a multiple of attn_tp
  experts    the rank's EP block of experts, stacked; inside each expert `inner` rows or
             cols are split over moe_tp

A rule applies to a layer by `scope` (dense / MoE / shared expert) and `attn` (models
with q LoRA fuse q_a|kv_a and keep q_b_proj; models without it, `q_lora_rank: null`,
keep kv_a alone and a direct q_proj). Which source slices make up each stored matrix of
a linear target, and when FP8 bytes may be copied, is derived in `units.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from kimi_trt.config import ModelConfig, WeightFormats
from kimi_trt.convert import dtypes
from kimi_trt.convert.fp8 import FP8_DTYPE
from kimi_trt.convert.hf_layout import linear_shapes
from kimi_trt.mapping import Mapping

FORMAT_VERSION = 1
BLOCK_FORMATS = ("fp8_block", "fp8_ue8m0")


@dataclass(frozen=True)
class Rule:
    """One row of the weight table.

    `target` and `sources` are relative to `transformer.layers.{L}.` / `model.layers.{L}.`
    for layer rules and absolute for global rules. `kind` says how the target is stored:
    linear (format of `cls`, plus scale tensors), norm (source dtype), router (fp32),
    embedding (the embeddings format), derived (the MLA dtype, computed in fp32).
    """

    target: str
    sources: tuple[str, ...]
    cls: str
    shard: str  # replicate | rows | cols | vocab | experts
    transform: (
        str  # copy | concat_rows | absorb_q | to_fp32 | pad_vocab | experts_up_gate | experts_down
    )
    kind: str  # linear | norm | router | embedding | derived
    scope: str = "all"  # all | dense | moe | shared (MoE layer with a shared expert)
    inner: str | None = None  # experts only: rows | cols split over moe_tp
    attn: str = "any"  # any | lora (q_lora_rank set) | direct (q_lora_rank null: q_proj)


LAYER_RULES: tuple[Rule, ...] = (
    Rule(
        "input_layernorm.weight", ("input_layernorm.weight",), "norms", "replicate", "copy", "norm"
    ),
    Rule(
        "attention.fused_a",
        ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        "attention",
        "replicate",
        "concat_rows",
        "linear",
        attn="lora",
    ),
    Rule(
        "attention.fused_a",
        ("self_attn.kv_a_proj_with_mqa",),
        "attention",
        "replicate",
        "copy",
        "linear",
        attn="direct",
    ),
    Rule(
        "attention.q_a_layernorm.weight",
        ("self_attn.q_a_layernorm.weight",),
        "norms",
        "replicate",
        "copy",
        "norm",
        attn="lora",
    ),
    Rule(
        "attention.kv_a_layernorm.weight",
        ("self_attn.kv_a_layernorm.weight",),
        "norms",
        "replicate",
        "copy",
        "norm",
    ),
    Rule(
        "attention.q_b_proj",
        ("self_attn.q_b_proj",),
        "attention",
        "rows",
        "copy",
        "linear",
        attn="lora",
    ),
    Rule(
        "attention.q_proj",
        ("self_attn.q_proj",),
        "attention",
        "rows",
        "copy",
        "linear",
        attn="direct",
    ),
    Rule("attention.kv_b_proj", ("self_attn.kv_b_proj",), "attention", "rows", "copy", "linear"),
    Rule(
        "attention.fused_q_proj",
        ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
        "attention",
        "rows",
        "absorb_q",
        "derived",
        attn="lora",
    ),
    Rule(
        "attention.fused_q_proj",
        ("self_attn.q_proj", "self_attn.kv_b_proj"),
        "attention",
        "rows",
        "absorb_q",
        "derived",
        attn="direct",
    ),
    Rule("attention.dense", ("self_attn.o_proj",), "attention", "cols", "copy", "linear"),
    Rule(
        "post_layernorm.weight",
        ("post_attention_layernorm.weight",),
        "norms",
        "replicate",
        "copy",
        "norm",
    ),
    # Dense SwiGLU MLP, TensorRT-LLM GatedMLP names: fc = gate_proj (activated), gate = up_proj.
    Rule("mlp.fc", ("mlp.gate_proj",), "dense_mlp", "rows", "copy", "linear", "dense"),
    Rule("mlp.gate", ("mlp.up_proj",), "dense_mlp", "rows", "copy", "linear", "dense"),
    Rule("mlp.proj", ("mlp.down_proj",), "dense_mlp", "cols", "copy", "linear", "dense"),
    # MoE: router in fp32, routed experts stacked [E_local, ...], up rows before gate rows.
    Rule(
        "mlp.router.weight", ("mlp.gate.weight",), "router", "replicate", "to_fp32", "router", "moe"
    ),
    Rule(
        "mlp.e_score_correction_bias",
        ("mlp.gate.e_score_correction_bias",),
        "router",
        "replicate",
        "to_fp32",
        "router",
        "moe",
    ),
    Rule(
        "mlp.fc",
        ("mlp.experts.{E}.up_proj", "mlp.experts.{E}.gate_proj"),
        "experts",
        "experts",
        "experts_up_gate",
        "linear",
        "moe",
        inner="rows",
    ),
    Rule(
        "mlp.proj",
        ("mlp.experts.{E}.down_proj",),
        "experts",
        "experts",
        "experts_down",
        "linear",
        "moe",
        inner="cols",
    ),
    Rule(
        "mlp.shared_expert.fc",
        ("mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj"),
        "shared_expert",
        "rows",
        "concat_rows",
        "linear",
        "shared",
    ),
    Rule(
        "mlp.shared_expert.proj",
        ("mlp.shared_experts.down_proj",),
        "shared_expert",
        "cols",
        "copy",
        "linear",
        "shared",
    ),
)

GLOBAL_HEAD: tuple[Rule, ...] = (
    Rule(
        "transformer.vocab_embedding.weight",
        ("model.embed_tokens.weight",),
        "embeddings",
        "vocab",
        "pad_vocab",
        "embedding",
    ),
)
GLOBAL_TAIL: tuple[Rule, ...] = (
    Rule("transformer.ln_f.weight", ("model.norm.weight",), "norms", "replicate", "copy", "norm"),
    Rule("lm_head.weight", ("lm_head.weight",), "lm_head", "vocab", "pad_vocab", "embedding"),
)
GLOBAL_RULES = GLOBAL_HEAD + GLOBAL_TAIL

# HF tensors the converter reads nowhere, on purpose (MTP layers are matched by index).
IGNORED_PATTERNS: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


@dataclass(frozen=True)
class TargetTensor:
    """One tensor of a rank file: what the header says, plus where it came from."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    cls: str  # one of hf_layout.TENSOR_CLASSES
    layer: int | None
    rule: Rule
    role: str = "weight"  # weight | scale

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---- derived sizes -------------------------------------------------------------------------


def vocab_size_padded(model: ModelConfig, mapping: Mapping) -> int:
    """Vocab rows of embedding/lm_head: padded with zero rows to a multiple of attn_tp."""
    t = mapping.attn_tp_size
    return math.ceil(model.vocab_size / t) * t


def mla_dtype(formats: WeightFormats) -> np.dtype:
    """Storage dtype of derived MLA tensors (fused_q_proj): fp32 if attention is fp32."""
    return dtypes.float32 if formats.attention == "fp32" else dtypes.bfloat16


def format_of(rule: Rule, formats: WeightFormats) -> str:
    """Weight format of a rule's target (norms and router are stored as-is / fp32)."""
    if rule.kind == "linear":
        return formats.for_class(rule.cls)
    if rule.kind == "embedding":
        return formats.embeddings
    return "asis"


def rule_applies(rule: Rule, model: ModelConfig, layer: int) -> bool:
    if rule.attn != "any" and rule.attn != ("direct" if model.q_lora_rank is None else "lora"):
        return False
    kind = model.layer_kinds[layer]
    if rule.scope == "all":
        return True
    if rule.scope == "shared":
        return kind == "moe" and model.n_shared_experts > 0
    return rule.scope == kind


_NORM_SHAPES = {
    "attention.q_a_layernorm.weight": lambda m: (m.q_lora_rank,),
    "attention.kv_a_layernorm.weight": lambda m: (m.kv_lora_rank,),
    "mlp.router.weight": lambda m: (m.n_routed_experts, m.hidden_size),
    "mlp.e_score_correction_bias": lambda m: (m.n_routed_experts,),
    "transformer.vocab_embedding.weight": lambda m: (m.vocab_size, m.hidden_size),
    "lm_head.weight": lambda m: (m.vocab_size, m.hidden_size),
}


def full_shape(rule: Rule, model: ModelConfig) -> tuple[int, ...]:
    """Logical (unsharded, unpadded) shape of a rule's target weight.

    Linear targets stack their sources' rows (`hf_layout.linear_shapes`); expert targets
    add the expert dimension; the absorbed q projection has kl + rope rows per head.
    """
    if rule.kind in ("linear", "derived"):
        shapes = linear_shapes(model)
        src = [shapes[s] for s in rule.sources]
        if rule.kind == "derived":
            return (model.num_attention_heads * model.kv_a_width, src[0][1])
        rows = sum(s[0] for s in src)
        if rule.shard == "experts":
            return (model.n_routed_experts, rows, src[0][1])
        return (rows, src[0][1])
    if rule.target in _NORM_SHAPES:
        return _NORM_SHAPES[rule.target](model)
    return (model.hidden_size,)  # input/post/final norms


def rank_shape(rule: Rule, model: ModelConfig, mapping: Mapping) -> tuple[int, ...]:
    """Shape of the rule's target weight on one rank (same on every rank)."""
    shape = list(full_shape(rule, model))
    t = mapping.attn_tp_size
    if rule.shard == "rows":
        shape[0] //= t
    elif rule.shard == "cols":
        shape[1] //= t
    elif rule.shard == "vocab":
        shape[0] = vocab_size_padded(model, mapping) // t
    elif rule.shard == "experts":
        shape[0] //= mapping.moe_ep_size
        shape[1 if rule.inner == "rows" else 2] //= mapping.moe_tp_size
    return tuple(shape)


def _stored(
    name: str, shape: tuple[int, ...], fmt: str, model: ModelConfig
) -> list[tuple[str, np.dtype, tuple[int, ...], str]]:
    """(name, dtype, shape, role) of each tensor that stores one linear weight in `fmt`."""
    if fmt in BLOCK_FORMATS:
        block = model.weight_block_size or (128, 128)
        *lead, rows, cols = shape
        scale = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        return [
            (name + ".weight", FP8_DTYPE, shape, "weight"),
            (name + ".weight_scale_inv", dtypes.float32, scale, "scale"),
        ]
    if fmt == "int8_wo":
        return [
            (name + ".weight", dtypes.int8, shape, "weight"),
            (name + ".per_channel_scale", dtypes.float32, shape[:-1], "scale"),
        ]
    dtype = dtypes.float32 if fmt == "fp32" else dtypes.bfloat16
    return [(name + ".weight", dtype, shape, "weight")]


def rule_targets(
    rule: Rule,
    model: ModelConfig,
    mapping: Mapping,
    formats: WeightFormats,
    layer: int | None,
) -> list[TargetTensor]:
    """The tensors one rule instance writes on each rank (weight first, then its scale)."""
    prefix = f"transformer.layers.{layer}." if layer is not None else ""
    name = prefix + rule.target
    shape = rank_shape(rule, model, mapping)
    if rule.kind == "linear":
        stored = _stored(name, shape, formats.for_class(rule.cls), model)
    elif rule.kind == "embedding":
        dtype = dtypes.float32 if formats.embeddings == "fp32" else dtypes.bfloat16
        stored = [(name, dtype, shape, "weight")]
    elif rule.kind == "derived":
        stored = [(name, mla_dtype(formats), shape, "weight")]
    elif rule.kind == "router":
        stored = [(name, dtypes.float32, shape, "weight")]
    else:  # norm: kept in the checkpoint's dtype
        stored = [(name, dtypes.bfloat16, shape, "weight")]
    return [TargetTensor(n, d, s, rule.cls, layer, rule, role) for n, d, s, role in stored]


def rule_instances(model: ModelConfig) -> list[tuple[Rule, int | None]]:
    """Every (rule, layer) pair in rank-file order: embedding, layers 0..N-1, ln_f, lm_head."""
    out: list[tuple[Rule, int | None]] = [(r, None) for r in GLOBAL_HEAD]
    for layer in range(model.num_hidden_layers):
        out += [(r, layer) for r in LAYER_RULES if rule_applies(r, model, layer)]
    return out + [(r, None) for r in GLOBAL_TAIL]


def rank_tensor_specs(
    model: ModelConfig, mapping: Mapping, formats: WeightFormats, rank: int
) -> list[TargetTensor]:
    """Every tensor of `rank{rank}.safetensors`, in file order, from the configs alone.

    Shapes do not depend on the rank (every shard is equal), but the argument is kept so
    callers never assume that. Raises ConfigError if `mapping` cannot split `model`.
    """
    from kimi_trt.mapping import check_layout

    check_layout(model, mapping)
    if not 0 <= rank < mapping.world_size:
        raise ValueError(f"rank {rank} outside world_size {mapping.world_size}")
    out: list[TargetTensor] = []
    for rule, layer in rule_instances(model):
        out += rule_targets(rule, model, mapping, formats, layer)
    return out


# ---- source accounting ---------------------------------------------------------------------


def source_names(rule: Rule, model: ModelConfig, layer: int | None) -> list[str]:
    """Full HF tensor names a rule instance reads (all experts, weights and FP8 scales)."""
    prefix = f"model.layers.{layer}." if layer is not None else ""
    bases: list[str] = []
    for src in rule.sources:
        if "{E}" in src:
            bases += [prefix + src.format(E=e) for e in range(model.n_routed_experts)]
        else:
            bases.append(prefix + src)
    if rule.target == "lm_head.weight" and model.tie_word_embeddings:
        bases = ["model.embed_tokens.weight"]
    if rule.kind not in ("linear", "derived"):
        return bases
    suffixes = (".weight", ".weight_scale_inv") if model.is_fp8 else (".weight",)
    return [b + s for b in bases for s in suffixes]


def consumed_sources(model: ModelConfig) -> set[str]:
    """Every HF tensor name some rule reads."""
    out: set[str] = set()
    for rule, layer in rule_instances(model):
        out.update(source_names(rule, model, layer))
    return out


def is_ignored(name: str, model: ModelConfig) -> bool:
    """True for tensors skipped on purpose: rotary caches and MTP (next-token) layers."""
    if any(re.fullmatch(p, name) for p in IGNORED_PATTERNS):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) in model.mtp_layers


def dtype_name(dtype: np.dtype) -> str:
    return dtype.name
