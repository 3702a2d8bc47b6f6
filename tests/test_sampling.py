"""Sampling is numerically safe for every value SamplingParams accepts, refuses the rest
with a UserError, and one request's failure in the generation loop ends only that request."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_trt.errors import UserError
from kimi_trt.runtime.engine import load_engine
from kimi_trt.runtime.sampling import SamplingError, SamplingParams, sample_token
from tests.runtime_support import PROMPTS, converted

TINY_VALUES = (1e-40, 1e-300, 5e-324)  # 5e-324: the smallest positive double


@pytest.fixture(scope="module")
def tiny_engine(tiny_ckpt, tmp_path_factory):
    return load_engine(converted(tiny_ckpt, tmp_path_factory.getbasetemp() / "runtime", "w1"))


def _logits(seed: int = 0, vocab: int = 1280) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 4
    logits[::7] = float("-inf")  # masked entries must never be drawn
    return logits


@pytest.mark.parametrize("temperature", [*TINY_VALUES, 1e-8, 0.6, 2.0, 1e300])
@pytest.mark.parametrize("top_p", [*TINY_VALUES, 0.3, 1.0])
@pytest.mark.parametrize("top_k", [0, 2, 10**12])
def test_extreme_values_draw_a_valid_token(temperature, top_p, top_k):
    logits = _logits()
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    token = sample_token(logits, params, params.generator())
    assert 0 <= token < logits.numel() and math.isfinite(float(logits[token]))
    if temperature <= 1e-8 or (top_p in TINY_VALUES and temperature <= 2.0):
        assert token == int(torch.argmax(logits))  # only the best token is left
    # (at temperature 1e300 every finite token is equally likely: a tiny top_p keeps one)


def test_extreme_logits_are_safe():
    """Logits at float32's range and a single finite entry: no overflow, no NaN."""
    big = torch.tensor([3.0e38, -3.0e38, 3.0e38 * 0.999, 0.0])
    params = SamplingParams(temperature=1e-40, seed=1)
    assert sample_token(big, params, params.generator()) == 0
    lone = torch.full((10,), float("-inf"))
    lone[6] = -1e30
    for p in (SamplingParams(temperature=0.7, top_p=1e-300, seed=1), SamplingParams()):
        assert sample_token(lone, p, p.generator()) == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_broken_logits_raise_sampling_error(bad):
    logits = _logits()
    logits[5] = bad
    for params in (SamplingParams(), SamplingParams(temperature=0.6, seed=0)):
        with pytest.raises(SamplingError):
            sample_token(logits, params, params.generator())
    with pytest.raises(SamplingError, match="every logit is -inf"):
        sample_token(torch.full((4,), float("-inf")), SamplingParams(), None)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": "0.5"},
        {"temperature": True},
        {"top_p": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.0000001},
        {"top_k": True},
        {"top_k": 2.0},
        {"max_new_tokens": 3.0},
        {"seed": 2**64},
        {"seed": -1},
        {"seed": 1.5},
    ],
)
def test_refused_values_are_user_errors(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


def test_largest_seed_is_accepted():
    params = SamplingParams(temperature=1.0, seed=2**64 - 1)
    first = sample_token(_logits(), params, params.generator())
    assert first == sample_token(_logits(), params, params.generator())


def test_one_failing_request_ends_alone(tiny_engine):
    """A request whose streaming callback raises ends with finish_reason "error" and its
    exception; the batch's other requests give exactly the tokens they give alone."""
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    alone = tiny_engine.generate(PROMPTS, params)

    def on_token(index: int, token: int) -> None:
        if index == 1:
            raise RuntimeError("consumer of request 1 broke")

    mixed = tiny_engine.generate(PROMPTS, params, on_token=on_token)
    assert mixed[1].finish_reason == "error" and "request 1 broke" in str(mixed[1].error)
    assert len(mixed[1].tokens) == 1
    for i in (0, 2):
        assert mixed[i].tokens == alone[i].tokens and mixed[i].error is None
