"""The Triton routing kernel against the torch reference.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors: tests/conftest.py
sets TRITON_INTERPRET before anything imports triton (it decides at import time). With a
GPU the same tests run the compiled kernel on CUDA tensors. Ids must match the reference
exactly and weights within 1e-6, including on adversarial inputs. (AOT compilation is in
test_routing_aot.py.)
"""

from __future__ import annotations

import pytest
import torch

from kimi_trt.plugins import routing_triton as rt
from kimi_trt.plugins.routing import RouterParams, route_noaux_tc
from kimi_trt.testing.routing_spec import adversarial_cases, spec_route_ids

if rt.is_interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
        "run these tests through pytest (tests/conftest.py sets it)"
    )
SCALE = 2.827


def _check_equal(logits, bias, params: RouterParams, launch=rt.DEFAULT_LAUNCH):
    logits, bias = logits.to(DEVICE), bias.to(DEVICE)
    want_ids, want_w = route_noaux_tc(logits, bias, **params.kwargs())
    ids, w = rt.route_triton(logits, bias, **params.kwargs(), launch=launch)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == want_ids.shape
    assert torch.equal(ids, want_ids), (ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-6)
    return ids.cpu(), w.cpu()


SHAPES = [
    # (E, k, n_group, topk_group, T, dtype)
    (384, 8, 1, 1, 19, torch.float32),  # Kimi-K2
    (384, 8, 1, 1, 9, torch.bfloat16),
    (256, 8, 8, 4, 13, torch.bfloat16),  # DeepSeek-V3
    (256, 8, 8, 4, 1, torch.float32),
    (384, 8, 8, 4, 6, torch.float32),  # group size 48: padded to 64
    (512, 16, 4, 2, 5, torch.float32),  # the limits
    (64, 2, 8, 4, 7, torch.float32),
    (8, 1, 1, 1, 3, torch.float32),
    (96, 3, 3, 2, 4, torch.bfloat16),  # non-power-of-two groups
    (384, 8, 1, 1, 0, torch.float32),  # T = 0
]


@pytest.mark.parametrize("e,k,g,tg,t,dtype", SHAPES)
def test_kernel_matches_reference(e, k, g, tg, t, dtype):
    gen = torch.Generator().manual_seed(e + 31 * k + t)
    logits = (torch.randn(t, e, generator=gen) * 2.5).to(dtype)
    bias = torch.randn(e, generator=gen) * 0.05
    for norm in (True, False):
        _check_equal(logits, bias, RouterParams(k, g, tg, SCALE, norm))


@pytest.mark.parametrize(
    "launch", [rt.LaunchConfig(1, 1), rt.LaunchConfig(4, 4), rt.LaunchConfig(8, 2)]
)
def test_launch_configs_agree(launch):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(11, 256, generator=gen).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen) * 0.05
    _check_equal(logits, bias, RouterParams(8, 8, 4, SCALE, True), launch)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(1e4) = inf: intended
@pytest.mark.parametrize("case", sorted(adversarial_cases(64)))
def test_adversarial_inputs(case):
    for e, (g, tg, k) in ((64, (8, 4, 8)), (384, (1, 1, 8)), (256, (8, 2, 5))):
        logits, bias = adversarial_cases(e)[case]
        params = RouterParams(k, g, tg, SCALE, True)
        ids, w = _check_equal(logits, bias, params)
        assert ids.tolist() == spec_route_ids(logits, bias, top_k=k, n_group=g, topk_group=tg)
        assert torch.isfinite(w).all()
        _check_equal(logits.to(torch.bfloat16), bias, params)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # -FLT_MAX + -FLT_MAX: intended
def test_nan_logits_still_give_distinct_in_range_ids():
    logits = torch.randn(4, 256)
    logits[0] = float("nan")
    logits[1, ::2] = float("nan")
    bias = torch.zeros(256, device=DEVICE)
    ids, _ = rt.route_triton(logits.to(DEVICE), bias, **RouterParams(8, 8, 4, 1.0, True).kwargs())
    for row in ids.cpu().tolist():
        assert len(set(row)) == 8 and all(0 <= i < 256 for i in row)
