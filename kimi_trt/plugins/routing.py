"""Kimi-K2 / DeepSeek-V3 expert routing ("noaux_tc"): semantics and the torch reference.

TensorRT-LLM's engine workflow only routes with softmax-based modes; Kimi-K2 routes with
sigmoid scores plus a learned correction bias. This module is the single definition of
that routing. Three implementations follow it and are tested against each other: the
vectorised torch reference below (the torch executor's CPU path), the Triton kernel in
`routing_triton` (the torch executor's CUDA path, and the TensorRT plugin's kernel in
`trt_plugin`), and transformers' `DeepseekV3TopkRouter` (the independent reference).

Inputs
    logits  [T, E] float32 or bfloat16: router logits (hidden @ W_gate^T), any T >= 0.
    bias    [E] float32: `e_score_correction_bias`; must be finite.
Attributes
    top_k (k), n_group (G), topk_group, routed_scaling_factor, norm_topk_prob.
    Limits: 1 <= E <= 512, 1 <= k <= 16, E % G == 0, 1 <= topk_group <= G,
    k <= topk_group * E / G, and E / G >= 2 whenever topk_group < G.
Outputs (exactly what TensorRT-LLM's MixtureOfExperts plugin consumes)
    token_selected_experts int32 [T, k] and token_final_scales float32 [T, k].

Semantics, per token (all arithmetic in float32):
 1. s = sigmoid(logits); c = s + bias. c is used only to choose experts.
 2. If topk_group < G: each group of E/G consecutive experts is scored by the sum of its
    two largest c (largest first); the topk_group best groups are kept and the experts of
    the other groups cannot be chosen. (When topk_group == G every group is kept, which
    is the same as skipping this step.)
 3. The k chosen experts are the k largest c among the kept experts, listed in
    descending order of c.
 4. w = s[chosen] (unbiased scores). If norm_topk_prob: w = w / (sum(w) + 1e-20).
    Finally w = w * routed_scaling_factor.

Deterministic tie-breaking: whenever two candidates have equal c (or two groups equal
scores), the lower expert id (lower group id) wins, and it is listed first. This is what
makes the torch, Triton and TensorRT implementations agree id for id. transformers uses
`torch.topk(sorted=False)`, whose tie order is unspecified, so it agrees as a set only on
inputs without ties.

Non-finite logits: +inf gives s = 1 and -inf gives s = 0, both handled exactly. NaN
logits are outside the contract: every implementation still returns k distinct in-range
ids per row (the MoE plugin indexes memory with them), but which ids is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_EXPERTS = 512
MAX_TOP_K = 16
NORM_EPS = 1e-20
LOGITS_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class RouterParams:
    """The routing attributes of one model (from config.json), passed to every backend."""

    top_k: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool

    def kwargs(self) -> dict:
        """Keyword arguments for `route_noaux_tc` / `route`."""
        return {
            "top_k": self.top_k,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
        }

    def check(self, num_experts: int) -> None:
        """Raise ValueError naming the attribute when these params cannot route E experts."""
        check_router_params(num_experts, **self.kwargs())


def check_router_params(
    num_experts: int,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> None:
    """Validate the attributes against the limits in the module docstring."""
    e, k, g = num_experts, top_k, n_group
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"router: num_experts={e} must be in 1..{MAX_EXPERTS}")
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"router: top_k={k} must be in 1..{MAX_TOP_K}")
    if g < 1 or e % g:
        raise ValueError(f"router: num_experts={e} is not divisible by n_group={g}")
    if not 1 <= topk_group <= g:
        raise ValueError(f"router: topk_group={topk_group} must be in 1..n_group={g}")
    if k > topk_group * (e // g):
        raise ValueError(
            f"router: top_k={k} exceeds the {topk_group * (e // g)} experts "
            f"of topk_group={topk_group} groups"
        )
    if topk_group < g and e // g < 2:
        raise ValueError(
            f"router: group size {e // g} < 2 (groups are scored by their top-2 experts)"
        )
    if not isinstance(norm_topk_prob, bool):
        raise ValueError(f"router: norm_topk_prob={norm_topk_prob!r} must be a bool")
    if not float(routed_scaling_factor) == float(routed_scaling_factor):  # NaN
        raise ValueError("router: routed_scaling_factor is NaN")


def check_logits_dtype(dtype: torch.dtype) -> None:
    """The router reads float32 or bfloat16 logits (every implementation, JIT and AOT)."""
    if dtype not in LOGITS_DTYPES:
        raise ValueError(f"router: logits dtype {dtype}, expected float32 or bfloat16")


def check_router_inputs(logits: torch.Tensor, bias: torch.Tensor, **params) -> tuple[int, int]:
    """Validate shapes/dtypes/attributes; return (num_tokens, num_experts)."""
    if logits.dim() != 2:
        raise ValueError(f"router: logits must be [T, E], got shape {tuple(logits.shape)}")
    check_logits_dtype(logits.dtype)
    num_tokens, num_experts = logits.shape
    if bias.shape != (num_experts,) or bias.dtype != torch.float32:
        raise ValueError(
            f"router: bias must be float32 [{num_experts}], got {bias.dtype} {tuple(bias.shape)}"
        )
    if bias.device != logits.device:
        raise ValueError(f"router: bias on {bias.device}, logits on {logits.device}")
    check_router_params(num_experts, **params)
    return num_tokens, num_experts


def _mask_unkept_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Step 2: set the choice score of experts outside the topk_group best groups to -inf."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, n_group, num_experts // n_group)
    top2 = grouped.topk(2, dim=-1).values  # values only: tie order cannot matter
    group_scores = top2[..., 0] + top2[..., 1]
    order = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :topk_group], True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def route_noaux_tc(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (selected expert ids int32 [T, k], final scales float32 [T, k]).

    Vectorised over tokens; a stable descending sort implements "lower id wins ties".
    Works on any device (it is also the eager baseline of bench/routing_gpu.py).
    """
    params = RouterParams(
        top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob
    ).kwargs()
    check_router_inputs(logits, bias, **params)
    scores = logits.float().sigmoid()
    choice = scores + bias
    if topk_group < n_group:
        choice = _mask_unkept_groups(choice, n_group, topk_group)
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + NORM_EPS)
    return ids.to(torch.int32), weights * routed_scaling_factor
