"""The torch routing reference against transformers' DeepseekV3TopkRouter and the spec.

transformers is the independent numerical reference (ids as sets, weights per id, on
inputs without ties); `kimi_trt.testing.routing_spec` is the literal per-token statement
of the tie-breaking rule; hypothesis checks the properties that must hold on any input.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from kimi_trt.plugins.router import route
from kimi_trt.plugins.routing import RouterParams, check_router_params, route_noaux_tc
from kimi_trt.testing.routing_spec import (
    adversarial_cases,
    float32_choice_scores,
    kept_groups,
    spec_route_ids,
)

SCALE = 2.827


def _valid(e: int, k: int, g: int, tg: int) -> bool:
    try:
        check_router_params(
            e, top_k=k, n_group=g, topk_group=tg, routed_scaling_factor=1.0, norm_topk_prob=True
        )
    except ValueError:
        return False
    return True


MATRIX = [
    (e, k, g, tg)
    for e in (8, 64, 256, 384)
    for k in (1, 2, 8)
    for g, tg in ((1, 1), (8, 4))
    if _valid(e, k, g, tg)
]


def _hf_router(e: int, k: int, g: int, tg: int, norm: bool, bias: torch.Tensor):
    """transformers' router with an identity gate, so its input *is* the logits."""
    cfg = DeepseekV3Config(
        hidden_size=e,
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_group=g,
        topk_group=tg,
        routed_scaling_factor=SCALE,
        norm_topk_prob=norm,
    )
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        router.e_score_correction_bias.copy_(bias)
    return router


def _sorted_by_id(ids: torch.Tensor, weights: torch.Tensor):
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("e,k,g,tg", MATRIX)
@pytest.mark.parametrize("norm", [True, False])
def test_matches_transformers_router(e, k, g, tg, norm):
    gen = torch.Generator().manual_seed(e * 1000 + k * 10 + g)
    bias = torch.randn(e, generator=gen) * 0.05
    router = _hf_router(e, k, g, tg, norm, bias)
    params = RouterParams(k, g, tg, SCALE, norm)
    for t in (0, 1, 7, 128):
        logits = torch.randn(t, e, generator=gen) * 3  # continuous: no ties
        with torch.no_grad():
            hf_logits, hf_w, hf_ids = router(logits)
        assert torch.equal(hf_logits, logits)  # identity gate is exact
        ids, w = route_noaux_tc(logits, bias, **params.kwargs())
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert ids.shape == w.shape == (t, k)
        a_ids, a_w = _sorted_by_id(ids, w)
        b_ids, b_w = _sorted_by_id(hf_ids, hf_w)
        assert torch.equal(a_ids, b_ids), f"T={t}: expert sets differ"
        torch.testing.assert_close(a_w, b_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("e,k,g,tg", MATRIX)
def test_order_and_ids_follow_the_spec(e, k, g, tg):
    gen = torch.Generator().manual_seed(7 + e + k)
    logits = torch.randn(7, e, generator=gen)
    bias = torch.randn(e, generator=gen) * 0.1
    ids, _ = route_noaux_tc(logits, bias, **RouterParams(k, g, tg, 1.0, True).kwargs())
    assert ids.tolist() == spec_route_ids(logits, bias, top_k=k, n_group=g, topk_group=tg)


@pytest.mark.parametrize("case", sorted(adversarial_cases(64)))
@pytest.mark.parametrize("g,tg,k", [(1, 1, 8), (8, 4, 8), (8, 2, 2)])
def test_ties_go_to_the_lowest_id(case, g, tg, k):
    logits, bias = adversarial_cases(64)[case]
    ids, w = route_noaux_tc(logits, bias, **RouterParams(k, g, tg, SCALE, True).kwargs())
    assert ids.tolist() == spec_route_ids(logits, bias, top_k=k, n_group=g, topk_group=tg)
    assert torch.isfinite(w).all()


def test_all_equal_scores_pick_the_first_experts_and_groups():
    ids, w = route_noaux_tc(
        torch.zeros(2, 64), torch.zeros(64), **RouterParams(4, 8, 2, 2.0, True).kwargs()
    )
    assert ids.tolist() == [[0, 1, 2, 3]] * 2  # group 0 and 1 kept; ids ascending
    torch.testing.assert_close(w, torch.full((2, 4), 0.5), rtol=0, atol=1e-7)


def test_bf16_logits_are_routed_in_float32():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 256, generator=gen) * 2).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen) * 0.01
    p = RouterParams(8, 8, 4, SCALE, True).kwargs()
    ids, w = route_noaux_tc(logits, bias, **p)
    ids32, w32 = route_noaux_tc(logits.float(), bias, **p)
    assert torch.equal(ids, ids32) and torch.equal(w, w32)


def test_dispatcher_uses_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(5, 64, generator=gen), torch.randn(64, generator=gen)
    p = RouterParams(8, 8, 4, SCALE, True).kwargs()
    for got, want in zip(route(logits, bias, **p), route_noaux_tc(logits, bias, **p), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "e,kwargs,message",
    [
        (513, dict(top_k=8, n_group=1, topk_group=1), "num_experts=513"),
        (64, dict(top_k=17, n_group=1, topk_group=1), "top_k=17"),
        (60, dict(top_k=8, n_group=8, topk_group=4), "not divisible by n_group=8"),
        (64, dict(top_k=8, n_group=8, topk_group=9), "topk_group=9"),
        (64, dict(top_k=9, n_group=8, topk_group=1), "exceeds the 8 experts"),
        (8, dict(top_k=2, n_group=8, topk_group=4), "group size 1 < 2"),
    ],
)
def test_bad_parameters_are_named(e, kwargs, message):
    with pytest.raises(ValueError, match=message):
        route_noaux_tc(
            torch.zeros(1, e),
            torch.zeros(e),
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            **kwargs,
        )


def test_bad_tensors_are_named():
    p = RouterParams(2, 1, 1, 1.0, True).kwargs()
    with pytest.raises(ValueError, match="logits must be"):
        route_noaux_tc(torch.zeros(8), torch.zeros(8), **p)
    with pytest.raises(ValueError, match="logits dtype"):
        route_noaux_tc(torch.zeros(1, 8, dtype=torch.float16), torch.zeros(8), **p)
    with pytest.raises(ValueError, match="bias must be float32"):
        route_noaux_tc(torch.zeros(1, 8), torch.zeros(8, dtype=torch.bfloat16), **p)


@st.composite
def routing_problems(draw):
    g, tg = draw(st.sampled_from([(1, 1), (4, 2), (8, 4), (8, 1), (16, 3)]))
    size = draw(st.sampled_from([2, 3, 8, 24]))
    e = g * size
    k = draw(st.integers(1, min(16, tg * size)))
    t = draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # coarse values make ties common; a scale makes saturation (s == 0 or 1) common too
    logits = torch.randint(-3, 4, (t, e), generator=gen).float() * draw(st.sampled_from([0.5, 9.0]))
    bias = torch.randint(-2, 3, (e,), generator=gen).float() * draw(
        st.sampled_from([0.0, 0.1, 5.0])
    )
    scale = draw(st.sampled_from([1.0, 2.5, SCALE]))
    return logits, bias, RouterParams(k, g, tg, scale, draw(st.booleans()))


@settings(max_examples=120, deadline=None)
@given(routing_problems())
def test_routing_properties(problem):
    logits, bias, params = problem
    ids, w = route_noaux_tc(logits, bias, **params.kwargs())
    t, e = logits.shape
    assert ids.shape == w.shape == (t, params.top_k)
    size = e // params.n_group
    _, choice = float32_choice_scores(logits, bias)
    for row in range(t):
        chosen = ids[row].tolist()
        assert len(set(chosen)) == params.top_k and all(0 <= i < e for i in chosen)
        keep = kept_groups(choice[row], params.n_group, params.topk_group)
        assert {i // size for i in chosen} <= keep
    assert (w >= 0).all()
    if params.norm_topk_prob and t:
        sums = w.double().sum(dim=-1)
        torch.testing.assert_close(
            sums, torch.full_like(sums, params.routed_scaling_factor), rtol=1e-6, atol=0
        )


def test_nan_logits_still_give_distinct_in_range_ids():
    logits = torch.randn(4, 256)
    logits[0] = float("nan")
    logits[1, ::2] = float("nan")
    for params in (RouterParams(8, 8, 4, 1.0, True), RouterParams(8, 1, 1, 1.0, True)):
        ids, _ = route_noaux_tc(logits, torch.zeros(256), **params.kwargs())
        for row in ids.tolist():
            assert len(set(row)) == 8 and all(0 <= i < 256 for i in row)
