"""`route`: the one entry the executor calls - the Triton kernel on CUDA, the torch reference elsewhere.

A module of its own so the reference (`routing`) and the kernel (`routing_triton`, which
imports the reference's parameter checks) never import each other.
"""

from __future__ import annotations

from typing import Any

import torch

from kimi_trt.plugins.routing import route_noaux_tc


def route(
    logits: torch.Tensor, bias: torch.Tensor, **params: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the Triton kernel for CUDA tensors, the torch reference otherwise.

    Same arguments and results as `route_noaux_tc` (the kernel agrees with it id for id).
    `params` are its keywords (top_k, n_group, topk_group, routed_scaling_factor,
    norm_topk_prob: `RouterParams.kwargs()`), passed on untouched: the signature is written
    once per implementation, not again here, and each implementation checks them.
    """
    if logits.is_cuda:
        from kimi_trt.plugins import routing_triton  # imports triton; CUDA hosts only

        return routing_triton.route_triton(logits, bias, **params)
    return route_noaux_tc(logits, bias, **params)
