"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, seeded).

Sampling runs on rank 0 only, on the gathered float32 logits, and rank 0 broadcasts the
chosen tokens with the next step - so every rank follows one decision and results do not
depend on the world size. Each request has its own generator seeded from its `seed`, so
a seeded request gives the same tokens whatever else is in the batch.

Numerically safe for every value `SamplingParams` accepts: the logits are shifted so
their maximum is 0 before dividing by the temperature and the arithmetic is float64, so
a temperature down to the smallest positive double (5e-324) gives 0 for the best token
and -inf (never NaN) for the others; the most likely token always survives the top-p cut
(top_p = 1e-300 keeps exactly it), so the distribution handed to `multinomial` always
has mass. Logits holding NaN or +inf (a broken model) raise `SamplingError` for that
request alone.

A request may carry a `TokenConstraint` (grammar-constrained tool calls, JSON output): the
serving layer builds it, the runtime only asks it which ids may come next and tells it
which id was chosen, so the runtime never imports chat or serving code.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Protocol

import torch

from kimi_trt.errors import UserError

# Kimi-K2's recommended sampling temperature: what the serving front ends use when a
# request gives none (the runtime itself defaults to greedy).
KIMI_DEFAULT_TEMPERATURE = 0.6
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


class SamplingError(RuntimeError):
    """No token can be drawn from these logits (NaN / +inf / nothing finite)."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. `temperature == 0` (or `top_k == 1`) is greedy.

    stop_token_ids: generation ends when one is sampled (it is not added to the output);
    None means the engine's defaults (config eos and <|im_end|> when a tokenizer is present).
    return_logits: keep the float32 logits of every step in the result (tests, logprobs).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (_is_real(self.temperature) and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise UserError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self) -> torch.Generator | None:
        """A CPU generator for this request (None when greedy: nothing is random)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(int(seed))


def _check_logits(logits: torch.Tensor) -> None:
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise SamplingError("the model produced NaN or +inf logits")
    if not bool(torch.isfinite(logits).any()):
        raise SamplingError("every logit is -inf: no token can be drawn")


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token id from float32 logits [V] (CPU); SamplingError for NaN/+inf logits."""
    _check_logits(logits)
    if params.greedy:
        return int(torch.argmax(logits))
    shifted = logits.double() - logits.max().double()  # best token: exactly 0
    scaled = shifted / params.temperature  # others: negative or -inf, never NaN
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # float64; the best token's term is exp(0) = 1
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of strictly more likely tokens
        cut = before >= params.top_p
        cut[0] = False  # the most likely token is always kept
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class TokenConstraint(Protocol):
    """A per-request restriction of the next token, built outside the runtime.

    `allowed()` is asked right before each of the request's tokens is chosen: a bool
    tensor over (a prefix of) the vocabulary, True where the id may come next, or None
    for no restriction at this step. `accept(token)` is told the id that was chosen
    (stop ids included), so the constraint can advance its state.
    """

    def allowed(self) -> torch.Tensor | None: ...

    def accept(self, token: int) -> None: ...


def constrain_logits(logits: torch.Tensor, constraint: TokenConstraint | None) -> torch.Tensor:
    """`logits` [V] with the ids the constraint forbids set to -inf (ids past its mask too).

    A mask that allows nothing leaves the logits as they are: a broken constraint must not
    make the sampler divide by zero for every request in the batch.
    """
    if constraint is None:
        return logits
    mask = constraint.allowed()
    if mask is None:
        return logits
    n = min(mask.shape[-1], logits.shape[-1])
    if not bool(mask[:n].any()):
        return logits
    out = logits.clone()
    out[n:] = float("-inf")
    out[:n].masked_fill_(~mask[:n], float("-inf"))
    return out
