"""Per-GPU memory plan: does a layout fit, and how much KV cache is left - before any weight is read.

Everything here is computed from `ModelConfig` + `BuildConfig` alone, and `make_plan` is
the one planner: `kimi-trt plan` and the build's plan stage both call it, and it applies the
backend/format/GPU rules (`kimi_trt.support`) as well as the memory rules, so the two can
never disagree.
- weight bytes per rank are what the backend holds in memory: the stored bytes of the
  converter's table for TensorRT-LLM (engines, and the PyTorch backend, which keeps the
  checkpoint's block-FP8 resident); for the torch executor, every weight decoded to its
  compute dtype (fp32 on CPU, bf16 on GPU), as `runtime.weights.load_rank_weights` does.
- stored weight bytes per rank come from the converter's weight table
  (`convert.weight_table.rank_tensor_specs`), the same list the converter writes into
  `rank{N}.safetensors`, so plan and output cannot disagree (tests check it against real
  converted files). Decoder layers of one kind are identical, so the table is evaluated on
  a config cut down to one layer of each kind and the per-layer bytes are multiplied: the
  1T-parameter K2 plans in milliseconds.
- the source checkpoint's parameter count and bytes come from `hf_layout.hf_tensors`.
- activations, KV cache and the verdict are estimated below; each estimate says what it
  assumes. The verdict uses TensorRT-LLM's rule: the KV cache gets
  `kv_cache_free_gpu_mem_fraction` of what is free after weights, activations and runtime.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

from kimi_trt.config import (
    LINEAR_CLASSES,
    BuildConfig,
    Limits,
    ModelConfig,
    Parallelism,
    WeightFormat,
    WeightFormats,
    load_build_config,
    load_model_config,
)
from kimi_trt.convert.hf_layout import TENSOR_CLASSES, hf_tensors
from kimi_trt.errors import ConfigError
from kimi_trt.gpus import GB, DeviceSpec, device_spec
from kimi_trt.mapping import Mapping, layout_problems
from kimi_trt.support import support_notes, support_problems

SHIPPED_K2_CONFIG = Path(__file__).resolve().parent / "assets" / "kimi-k2-instruct.config.json"

ACT_BYTES = 2  # activations run in bf16
LOGIT_BYTES = 4  # TensorRT-LLM keeps logits in fp32
KV_DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
MAX_SEARCH_WORLD = 256
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- weights: per-layer-kind evaluation ------------------------------------------------------


def _layer_of(t: Any) -> int | None:
    layer = getattr(t, "layer", None)
    if layer is not None:
        return layer
    m = _LAYER_RE.search(t.name)
    return int(m.group(1)) if m else None


def _reduced_model(model: ModelConfig) -> tuple[ModelConfig, dict[int, int]]:
    """The model cut to the fewest leading layers holding every layer kind, and how many
    layers of the full model each kept layer stands for."""
    kinds = model.layer_kinds
    wanted = set(kinds)
    first: dict[str, int] = {}
    for i, k in enumerate(kinds):
        first.setdefault(k, i)
        if len(first) == len(wanted):
            break
    n = max(first.values()) + 1
    weight = {first[k]: kinds.count(k) for k in first}
    return dataclasses.replace(model, num_hidden_layers=n), weight


def scaled_sum(
    model: ModelConfig,
    tensors_of: Callable[[ModelConfig], Iterable[Any]],
    value: Callable[[Any], int],
    key: Callable[[Any], str] = lambda t: t.cls,
) -> dict[str, int]:
    """sum(value(t)) by key(t) over tensors_of(model), via one layer of each kind."""
    small, weight = _reduced_model(model)
    out: dict[str, int] = defaultdict(int)
    for t in tensors_of(small):
        layer = _layer_of(t)
        mult = 1 if layer is None else weight.get(layer, 0)
        out[key(t)] += mult * value(t)
    return dict(out)


@dataclass(frozen=True)
class SourceSummary:
    """The Hugging Face checkpoint as config.json describes it."""

    parameters: int  # model parameters (FP8 scales not counted)
    scale_elements: int  # fp32 weight_scale_inv elements
    bytes: int  # tensor bytes on disk
    bytes_by_class: dict[str, int]


@lru_cache(maxsize=16)
def source_summary(model: ModelConfig) -> SourceSummary:
    def kind(t: Any) -> str:
        return "scale" if t.is_scale else "param"

    numel = scaled_sum(model, hf_tensors, lambda t: t.numel, kind)
    by_class = scaled_sum(model, hf_tensors, lambda t: t.nbytes)
    return SourceSummary(
        numel.get("param", 0), numel.get("scale", 0), sum(by_class.values()), by_class
    )


@lru_cache(maxsize=512)
def rank_weight_bytes(
    model: ModelConfig, mapping: Mapping, formats: WeightFormats, rank: int
) -> dict[str, int]:
    """Bytes of rank{rank}.safetensors' tensors by tensor class, from the converter's table."""
    from kimi_trt.convert.weight_table import rank_tensor_specs

    def specs(m: ModelConfig) -> list[Any]:
        return rank_tensor_specs(m, mapping, formats, rank)

    got = scaled_sum(model, specs, lambda t: t.nbytes)
    return {c: got.get(c, 0) for c in TENSOR_CLASSES} | {
        c: v for c, v in got.items() if c not in TENSOR_CLASSES
    }


def torch_compute_bytes(device: DeviceSpec) -> int:
    """Bytes per element the torch executor computes in: fp32 on CPU, bf16 on a GPU."""
    return 4 if device.shared_memory else 2


@lru_cache(maxsize=512)
def torch_held_bytes(
    model: ModelConfig, mapping: Mapping, formats: WeightFormats, rank: int, elem: int
) -> dict[str, int]:
    """Bytes the torch executor holds for rank{rank}: every stored weight decoded to `elem`
    bytes per element (scale tensors consumed), the router in fp32 - exactly the tensors
    `runtime.weights.load_rank_weights` returns."""
    from kimi_trt.convert.weight_table import rank_tensor_specs

    def specs(m: ModelConfig) -> list[Any]:
        return [t for t in rank_tensor_specs(m, mapping, formats, rank) if t.role == "weight"]

    def held(t: Any) -> int:
        return t.numel * (4 if t.rule.kind == "router" else elem)

    got = scaled_sum(model, specs, held)
    return {c: got.get(c, 0) for c in TENSOR_CLASSES} | {
        c: v for c, v in got.items() if c not in TENSOR_CLASSES
    }


def held_weight_bytes(
    build: BuildConfig, model: ModelConfig, device: DeviceSpec, mapping: Mapping, rank: int
) -> dict[str, int]:
    """What one rank of `build.backend` holds in memory for its weights, by tensor class."""
    if build.backend == "torch":
        return torch_held_bytes(model, mapping, build.weights, rank, torch_compute_bytes(device))
    return rank_weight_bytes(model, mapping, build.weights, rank)


# ---- activations and KV cache ------------------------------------------------------------


def kv_bytes_per_token(model: ModelConfig, kv_dtype: str) -> int:
    """MLA caches one latent per token per layer: (kv_lora_rank + rope dims) x layers x dtype."""
    return model.kv_a_width * model.num_hidden_layers * KV_DTYPE_BYTES[kv_dtype]


def activation_bytes(model: ModelConfig, mapping: Mapping, limits: Limits) -> dict[str, int]:
    """Upper-bound estimate of one rank's activation memory for a max_num_tokens step.

    TensorRT reuses activation buffers across layers, so the peak is the residual stream
    plus the largest single layer plus the logits. Assumptions: context-phase MLA
    materialises per-head K and V for the step's tokens; the MoE plugin sizes its
    workspace for every routed row (tokens x top_k) landing on this rank; with attention
    DP the MoE sees the tokens of all ranks (they are gathered before the experts);
    logits are fp32 for max_batch_size last tokens over this rank's vocabulary slice.
    """
    t = limits.max_num_tokens
    h = model.hidden_size
    a_tp = mapping.attn_tp_size
    heads = model.num_attention_heads // a_tp
    attention = t * (
        (model.q_lora_rank or 0)
        + model.kv_a_width
        + heads * (2 * model.qk_head_dim + 2 * model.v_head_dim)
    )
    dense = 3 * t * (model.intermediate_size // a_tp) if model.dense_layers else 0
    moe = 0
    if model.moe_layers:
        moe_t = t * (mapping.world_size if mapping.attention_dp else 1)
        inter = model.moe_intermediate_size // mapping.moe_tp_size
        rows = moe_t * model.num_experts_per_tok
        shared = model.moe_intermediate_size * model.n_shared_experts // a_tp
        moe = rows * (2 * h + 3 * inter) + moe_t * (h + 3 * shared)
        moe += moe_t * model.n_routed_experts * 2  # fp32 router logits, in bf16 units
    vocab = -(-model.vocab_size // a_tp)
    return {
        "residual": 3 * t * h * ACT_BYTES,
        "largest_layer": max(attention, dense, moe) * ACT_BYTES,
        "logits": limits.max_batch_size * vocab * LOGIT_BYTES,
    }


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankMemory:
    """Memory of the fullest rank of a layout on one device."""

    device_bytes: int  # memory this rank may use (a host's ranks share its RAM)
    weights_by_class: dict[str, int]
    activations_by_part: dict[str, int]
    reserved: int
    kv_bytes_per_token: int
    kv_fraction: float

    @property
    def weights(self) -> int:
        return sum(self.weights_by_class.values())

    @property
    def activations(self) -> int:
        return sum(self.activations_by_part.values())

    @property
    def free_after_load(self) -> int:
        return self.device_bytes - self.weights - self.activations - self.reserved

    @property
    def kv_budget(self) -> int:
        return int(max(self.free_after_load, 0) * self.kv_fraction)

    @property
    def kv_tokens(self) -> int:
        return self.kv_budget // self.kv_bytes_per_token


def layout_name(p: Parallelism) -> str:
    """Short name: EP16, TP8, TP8 (EP4 x MoE-TP2), each with '+ attention DP' when set."""
    if p.tp == 1:
        base = "single rank"
    elif p.moe_tp == 1:
        base = f"EP{p.ep}"
    elif p.ep == 1:
        base = f"TP{p.tp}"
    else:
        base = f"TP{p.tp} (EP{p.ep} x MoE-TP{p.moe_tp})"
    return base + (" + attention DP" if p.attention_dp else "")


def nodes_needed(device: DeviceSpec, world: int) -> int:
    return -(-world // device.nvlink_domain)


@dataclass
class Plan:
    """The memory plan of one build config on its device; `fits` and `reason` gate `build`."""

    device: DeviceSpec
    parallelism: Parallelism
    limits: Limits
    source: SourceSummary
    rank: RankMemory
    problems: list[str]  # why the layout cannot split the model (layout_problems)
    backend: str = "trtllm"
    unsupported: list[str] = field(default_factory=list)  # kimi_trt.support problems
    fits: bool = False
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    suggestion: Plan | None = None
    # weight bytes per rank by class if every linear class were stored in one format
    by_format: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.parallelism.world_size

    @property
    def layout(self) -> str:
        return layout_name(self.parallelism)

    @property
    def nodes(self) -> int:
        return nodes_needed(self.device, self.world_size)

    @property
    def kv_sequences(self) -> int:
        """Sequences of max_seq_len one rank's cache holds."""
        return self.rank.kv_tokens // self.limits.max_seq_len

    @property
    def system_kv_tokens(self) -> int:
        """Tokens the whole deployment caches. Under attention TP every rank caches the same
        tokens (MLA's single latent head is not split); under attention DP each rank caches
        its own requests, so capacity multiplies by the world size."""
        ways = self.world_size if self.parallelism.attention_dp else 1
        return self.rank.kv_tokens * ways

    def where(self) -> str:
        """'2 nodes of 8 x H100 SXM 80 GB' / '16 of the 72 GPUs of one NVL72 rack'."""
        d = self.device
        if d.shared_memory:
            return f"{self.world_size} rank(s) on this host"
        if d.nvlink_domain > 8:
            return f"{self.world_size} of the {d.nvlink_domain} GPUs of one {d.domain_label}"
        n = self.nodes
        per = min(self.world_size, d.nvlink_domain)
        return f"{n} {d.domain_label}{'s' if n > 1 else ''} of {per} x {d.label}"


def _layout_kv_verdict(plan: Plan) -> tuple[bool, str]:
    r, lim = plan.rank, plan.limits
    if plan.unsupported:
        return False, f"backend {plan.backend} cannot run this build: " + "; ".join(
            plan.unsupported
        )
    if plan.problems:
        return False, f"layout {plan.layout} cannot split this model: " + "; ".join(plan.problems)
    load = r.weights + r.activations + r.reserved
    if r.free_after_load < 0:
        need = (
            f"weights {r.weights / GB:.1f} GB + activations {r.activations / GB:.1f} GB + "
            f"runtime {r.reserved / GB:.1f} GB = {load / GB:.1f} GB per rank"
        )
        if plan.device.shared_memory:
            w = plan.world_size
            return False, (
                f"{need}, x {w} rank(s) = {w * load / GB:.1f} GB, exceed this host's "
                f"{plan.device.memory_bytes / GB:.1f} GB of RAM"
            )
        return False, (
            f"{need} exceed the {r.device_bytes / GB:.1f} GB of one {plan.device.label} by "
            f"{-r.free_after_load / GB:.1f} GB"
        )
    if plan.kv_sequences < 1:
        return False, (
            f"only {r.kv_tokens} tokens of KV cache fit per rank; one sequence of "
            f"max_seq_len={lim.max_seq_len} needs {lim.max_seq_len * r.kv_bytes_per_token / GB:.2f} GB"
        )
    return True, (
        f"{r.kv_budget / GB:.1f} GB of KV cache per rank = {r.kv_tokens:,} tokens = "
        f"{plan.kv_sequences} sequence(s) of {lim.max_seq_len} tokens"
    )


def _notes(plan: Plan) -> list[str]:
    out = []
    if plan.fits and plan.kv_sequences < plan.limits.max_batch_size:
        out.append(
            f"only {plan.kv_sequences} full-length sequences fit per rank, fewer than "
            f"max_batch_size={plan.limits.max_batch_size}: batches will be cut by the KV cache"
        )
    if not plan.device.shared_memory and plan.nodes > 1:
        out.append(
            f"{plan.world_size} ranks span {plan.nodes} {plan.device.domain_label}s: "
            "expert all-to-all and all-reduce cross the inter-node network"
        )
    return out


def _rank_memory(
    build: BuildConfig, model: ModelConfig, device: DeviceSpec, ranks: Iterable[int]
) -> RankMemory:
    mapping = Mapping.from_parallelism(build.parallelism)
    per_rank = [held_weight_bytes(build, model, device, mapping, r) for r in ranks]
    weights = max(per_rank, key=lambda d: sum(d.values()), default={})
    share = build.parallelism.world_size if device.shared_memory else 1
    return RankMemory(
        device_bytes=device.memory_bytes // share,
        weights_by_class=dict(weights),
        activations_by_part=activation_bytes(model, mapping, build.limits),
        reserved=device.reserved_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model, build.kv_cache_dtype),
        kv_fraction=build.kv_cache_free_gpu_mem_fraction,
    )


def _plan_layout(
    build: BuildConfig, model: ModelConfig, device: DeviceSpec, all_ranks: bool
) -> Plan:
    p = build.parallelism
    problems = layout_problems(model, Mapping.from_parallelism(p))
    world = p.world_size
    ranks = range(world) if all_ranks else sorted({0, world - 1})
    rank = _rank_memory(build, model, device, [] if problems else ranks)
    plan = Plan(device, p, build.limits, source_summary(model), rank, problems, build.backend)
    plan.unsupported = support_problems(build, model)
    plan.fits, plan.reason = _layout_kv_verdict(plan)
    plan.notes = _notes(plan) + support_notes(build, model)
    return plan


def candidate_layouts(world: int) -> list[Parallelism]:
    """Every (ep, moe_tp, attention_dp) split of `world` ranks, EP-heavy first."""
    out = []
    moe_tp = 1
    while moe_tp <= world:
        if world % moe_tp == 0:
            for dp in (False, True):
                out.append(
                    Parallelism(tp=world, ep=world // moe_tp, moe_tp=moe_tp, attention_dp=dp)
                )
        moe_tp *= 2
    return out


def smallest_fitting_layout(
    build: BuildConfig, model: ModelConfig, device: DeviceSpec
) -> Plan | None:
    """Fewest ranks (powers of two) whose layout fits; among those, the most expert-parallel
    one (MoE-TP cuts each expert's GEMMs into slivers; peers deploy K2 with EP), then the
    most KV tokens. None on a host whose ranks share its RAM (more ranks cannot help there)."""
    if device.shared_memory:
        return None
    world = 1
    while world <= MAX_SEARCH_WORLD:
        fitting = []
        for p in candidate_layouts(world):
            if layout_problems(model, Mapping.from_parallelism(p)):
                continue
            cand = _plan_layout(build.model_copy(update={"parallelism": p}), model, device, False)
            if cand.fits:
                fitting.append(cand)
        if fitting:
            return max(fitting, key=lambda c: (-c.parallelism.moe_tp, c.system_kv_tokens))
        world *= 2
    return None


LINEAR_FORMATS: tuple[str, ...] = get_args(WeightFormat)


def weights_by_format(build: BuildConfig, model: ModelConfig) -> dict[str, dict[str, int]]:
    """Rank 0's weight bytes by class with every linear class in each format in turn (the
    what-if of the `weights:` section); empty when the layout cannot split the model."""
    mapping = Mapping.from_parallelism(build.parallelism)
    if layout_problems(model, mapping):
        return {}
    out = {}
    for fmt in LINEAR_FORMATS:
        formats = build.weights.model_copy(update=dict.fromkeys(LINEAR_CLASSES, fmt))
        got = rank_weight_bytes(model, mapping, formats, 0)
        out[fmt] = {c: got[c] for c in LINEAR_CLASSES}
    return out


def make_plan(build: BuildConfig, model: ModelConfig) -> Plan:
    """The plan of `build` on its device, with the smallest layout that fits that device."""
    device = device_spec(build.gpu)
    plan = _plan_layout(build, model, device, all_ranks=True)
    plan.suggestion = smallest_fitting_layout(build, model, device)
    plan.by_format = weights_by_format(build, model)
    if not plan.fits and not plan.unsupported:
        if device.shared_memory:
            plan.reason += "; the ranks of one host share its RAM, so more ranks do not help"
        elif plan.suggestion is None:
            plan.reason += f"; no layout up to {MAX_SEARCH_WORLD} x {device.label} fits"
        else:
            s = plan.suggestion
            plan.reason += f"; needs {s.layout}: {s.where()}"
    return plan


def plan_model_config(build: BuildConfig, model_config: str | Path | None) -> tuple[Path, str]:
    """The config.json to plan with, and a note saying where it came from: `model_config`
    when given, else the checkpoint's, else (no checkpoint yet) the shipped Kimi-K2 config."""
    if model_config is not None:
        return Path(model_config), ""
    own = build.checkpoint / "config.json"
    if own.is_file():
        return own, ""
    return SHIPPED_K2_CONFIG, (
        f"no checkpoint at {build.checkpoint} yet (paths in the YAML are relative to the YAML's "
        f"directory): planned with the shipped Kimi-K2-Instruct config {SHIPPED_K2_CONFIG.name}; "
        "pass --model-config config.json to plan another model"
    )


def load_plan(config_path: str | Path, model_config: str | Path | None = None) -> Plan:
    """Plan a build YAML with `plan_model_config`'s choice of model config."""
    build = load_build_config(config_path)
    path, note = plan_model_config(build, model_config)
    plan = make_plan(build, load_model_config(path))
    if note:
        plan.notes.insert(0, note)
    return plan


def require_fit(plan: Plan) -> None:
    """Raise (exit 2) with the planner's numbers when the layout does not fit its device, or
    the backend's reason when the backend cannot run the build at all."""
    if plan.unsupported:
        raise ConfigError(plan.reason)
    if not plan.fits:
        raise ConfigError(f"{plan.layout} on {plan.device.label} does not fit: {plan.reason}")
