"""The noaux_tc routing rule written the slowest, most literal way (one token at a time).

An independent oracle for the tie-breaking and group rules of `kimi_trt.plugins.routing`:
plain Python floats are float64, so scores are first rounded through float32 tensors
exactly as every implementation computes them (sigmoid and the bias add in float32).
Used by tests only.
"""

from __future__ import annotations

import torch


def float32_choice_scores(logits: torch.Tensor, bias: torch.Tensor) -> tuple[list, list]:
    """Per-token (s, c) as Python lists, computed in float32 by torch."""
    scores = logits.float().sigmoid()
    return scores.tolist(), (scores + bias.float()).tolist()


def kept_groups(choice_row: list[float], n_group: int, topk_group: int) -> set[int]:
    """Groups kept for one token: best top-2 sums, lower group id first on ties."""
    size = len(choice_row) // n_group
    sums = []
    for g in range(n_group):
        top = sorted(choice_row[g * size : (g + 1) * size], reverse=True)[:2]
        # float32 addition of the two largest, as the implementations do it
        sums.append(float(torch.tensor(top[0]) + torch.tensor(top[1])) if size >= 2 else top[0])
    order = sorted(range(n_group), key=lambda g: (-sums[g], g))
    return set(order[:topk_group]) if topk_group < n_group else set(range(n_group))


def spec_route_ids(
    logits: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int, topk_group: int
) -> list[list[int]]:
    """Selected expert ids per token, in the documented order (c descending, id ascending)."""
    _, choice = float32_choice_scores(logits, bias)
    result = []
    for row in choice:
        size = len(row) // n_group
        keep = kept_groups(row, n_group, topk_group)
        candidates = [e for e in range(len(row)) if e // size in keep]
        result.append(sorted(candidates, key=lambda e: (-row[e], e))[:top_k])
    return result


def adversarial_cases(
    num_experts: int, seed: int = 5
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (logits, bias) pairs that stress ties, saturation, infinities and the bias.

    num_experts must be a multiple of 8 (the group-tie case spans 8 groups).
    """
    e = num_experts
    gen = torch.Generator().manual_seed(seed)
    inf_mix = torch.randn(4, e, generator=gen)
    inf_mix[:, ::5] = float("-inf")
    inf_mix[:, 3::11] = float("inf")
    saturated = torch.full((2, e), 30.0)  # sigmoid(30) == 1.0 exactly in float32
    saturated[1, ::3] = float("inf")
    return {
        "all-equal": (torch.zeros(3, e), torch.zeros(e)),
        "repeated-values": (
            torch.tensor([0.0, 1.0, 1.0, 0.5] * (e // 4)).repeat(3, 1),
            torch.zeros(e),
        ),
        "saturated": (saturated, torch.zeros(e)),
        "inf-mix": (inf_mix, torch.zeros(e)),
        "large-logits": (torch.randn(4, e, generator=gen) * 1e4, torch.zeros(e)),  # s in {0, 1}
        "bias-swamps-scores": (torch.randn(3, e, generator=gen), torch.full((e,), 1e8)),
        "bias-decides": (torch.randn(3, e, generator=gen), torch.randn(e, generator=gen) * 50),
        "groups-tie": (torch.arange(e // 8, dtype=torch.float32).repeat(3, 8), torch.zeros(e)),
    }
