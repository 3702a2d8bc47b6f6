"""The plan as output: `kimi-trt plan --json` (every number, bytes as integers) and the text
table humans read. Kept apart from the planner (kimi_trt.plan) so each stays small."""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_trt.config import LINEAR_CLASSES
from kimi_trt.gpus import GB
from kimi_trt.plan import Plan


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """`kimi-trt plan --json`: every number of the plan, bytes as integers."""
    r = plan.rank
    out: dict[str, Any] = {
        "fits": plan.fits,
        "reason": plan.reason,
        "backend": plan.backend,
        "unsupported": plan.unsupported,
        "device": dataclasses.asdict(plan.device),
        "layout": {
            "name": plan.layout,
            **plan.parallelism.model_dump(),
            "world_size": plan.world_size,
            "nodes": plan.nodes,
            "problems": plan.problems,
        },
        "source_checkpoint": dataclasses.asdict(plan.source),
        "per_rank": {
            "memory_bytes": r.device_bytes,
            "weights_bytes": r.weights,
            "weights_by_class": r.weights_by_class,
            "activations_bytes": r.activations,
            "activations_by_part": r.activations_by_part,
            "reserved_bytes": r.reserved,
            "free_after_load_bytes": r.free_after_load,
            "kv_cache_free_gpu_mem_fraction": r.kv_fraction,
            "kv_budget_bytes": r.kv_budget,
            "kv_bytes_per_token": r.kv_bytes_per_token,
            "kv_tokens": r.kv_tokens,
            "kv_sequences_of_max_seq_len": plan.kv_sequences,
        },
        "system_kv_tokens": plan.system_kv_tokens,
        "limits": plan.limits.model_dump(),
        "notes": plan.notes,
        "weights_by_format_per_rank": plan.by_format,
        "suggestion": None,
    }
    s = plan.suggestion
    if s is not None:
        out["suggestion"] = {
            "name": s.layout,
            **s.parallelism.model_dump(),
            "world_size": s.world_size,
            "nodes": s.nodes,
            "where": s.where(),
            "weights_bytes_per_rank": s.rank.weights,
            "kv_tokens_per_rank": s.rank.kv_tokens,
            "system_kv_tokens": s.system_kv_tokens,
        }
    return out


def _gb(n: int) -> str:
    return f"{n / GB:10.2f} GB"


def _render_by_format(by_format: dict[str, dict[str, int]]) -> list[str]:
    if not by_format:
        return []
    fmts = list(by_format)
    lines = [
        "",
        "weights per rank (GB) if a class were stored as:",
        f"  {'':<15}" + "".join(f"{f:>11}" for f in fmts),
    ]
    for cls in LINEAR_CLASSES:
        lines.append(f"  {cls:<15}" + "".join(f"{by_format[f][cls] / GB:11.2f}" for f in fmts))
    return lines


def render_plan(plan: Plan) -> str:
    """The plan as a plain-text table for humans."""
    r, src = plan.rank, plan.source
    lines = [
        f"device   {plan.device.label} (sm {plan.device.sm or '-'}, FP8 {'yes' if plan.device.fp8 else 'no'}, "
        f"NVLink domain {plan.device.nvlink_domain})",
        f"backend  {plan.backend}",
        f"layout   {plan.layout}: tp={plan.parallelism.tp} ep={plan.parallelism.ep} "
        f"moe_tp={plan.parallelism.moe_tp} attention_dp={plan.parallelism.attention_dp} "
        f"-> {plan.where()}",
        f"model    {src.parameters:,} parameters, {src.bytes / GB:,.1f} GB in the HF checkpoint",
        "",
        "per rank (fullest rank)",
    ]
    for cls, n in r.weights_by_class.items():
        lines.append(f"  weights  {cls:<22}{_gb(n)}")
    lines.append(f"  weights  {'total':<22}{_gb(r.weights)}")
    for part, n in r.activations_by_part.items():
        lines.append(f"  activ.   {part:<22}{_gb(n)}")
    lines += [
        f"  runtime  {'reserved (estimate)':<22}{_gb(r.reserved)}",
        f"  memory   {'of the device':<22}{_gb(r.device_bytes)}",
        f"  free     {'after load':<22}{_gb(r.free_after_load)}",
        f"  KV cache {f'x {r.kv_fraction:g} of free':<22}{_gb(r.kv_budget)}",
        f"  KV cache {'bytes per token':<22}{r.kv_bytes_per_token:>13,}",
        f"  KV cache {'tokens':<22}{r.kv_tokens:>13,}",
        f"  KV cache {f'seqs of {plan.limits.max_seq_len}':<22}{plan.kv_sequences:>13,}",
        f"system KV tokens                  {plan.system_kv_tokens:>13,}",
        "",
        ("FITS" if plan.fits else "DOES NOT FIT") + f" - {plan.reason}",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    s = plan.suggestion
    if s is not None:
        lines.append(
            f"smallest layout that fits a {plan.device.label}: {s.layout} ({s.where()}), "
            f"{s.rank.weights / GB:.1f} GB weights per rank, {s.system_kv_tokens:,} KV tokens in all"
        )
    return "\n".join(lines + _render_by_format(plan.by_format))


def plan_summary_line(plan: Plan) -> str:
    """One line of the plan's per-rank numbers, as the shipped build YAMLs state them in
    their header (tests/test_build_configs.py checks each header against the planner)."""
    r = plan.rank
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    return (
        f"{plan.backend} {plan.layout} on {plan.device.label}: weights {r.weights / GB:.1f} GB, "
        f"activations {r.activations / GB:.1f} GB, runtime {r.reserved / GB:.1f} GB, "
        f"free {r.free_after_load / GB:.1f} GB -> KV {r.kv_tokens:,} tokens per rank "
        f"({plan.kv_sequences} x {plan.limits.max_seq_len}), {plan.system_kv_tokens:,} in all: "
        f"{verdict}"
    )
