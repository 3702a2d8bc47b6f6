"""The generation loop run by rank 0: slots, prefill, incremental decode, stopping, streaming.

Requests wait in a queue and are admitted into free cache slots; each round prefills the
newly admitted prompts (one step, prompts of different lengths packed together) and then
advances every running request by one token (one decode step). A request leaves its slot
when it samples a stop token, reaches max_new_tokens or the cache length, or when the
streaming callback returns False (cancelled); the slot is reused by the next waiting
request in the same call. Each step is a `StepPlan` that `run_step` broadcasts and
executes on all ranks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kimi_trt.runtime.executor import StepPlan
from kimi_trt.runtime.sampling import (
    SamplingParams,
    TokenConstraint,
    constrain_logits,
    sample_token,
)

OnToken = Callable[[int, int], "bool | None"]


@dataclass
class GenerationResult:
    """One prompt's outcome. `tokens` excludes the stop token; finish_reason is
    "stop" (stop token), "length" (max_new_tokens or cache length), "cancelled", or
    "error" when this request alone failed (sampling raised; `error` says why) - the
    other requests of the batch run on."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logits: list[torch.Tensor] | None = None  # per sampled step, with params.return_logits
    error: Exception | None = None


@dataclass
class _Request:
    index: int
    params: SamplingParams
    stop_ids: frozenset[int]
    max_len: int  # prompt + generated tokens may not exceed this (cache length)
    result: GenerationResult
    generator: torch.Generator | None
    slot: int = -1
    constraint: TokenConstraint | None = None

    @property
    def length(self) -> int:
        return len(self.result.prompt_tokens) + len(self.result.tokens)


def _pick_slot(free: list[int], active: dict[int, _Request], owner: Callable[[int], int | None]):
    """The free slot whose attention-DP owner runs the fewest requests (lowest slot on ties)."""
    load: dict[int | None, int] = {}
    for s in active:
        load[owner(s)] = load.get(owner(s), 0) + 1
    best = min(free, key=lambda s: (load.get(owner(s), 0), s))
    free.remove(best)
    return best


class GenerationLoop:
    """Schedules one `generate` call's requests over `n_slots` cache slots."""

    def __init__(
        self,
        run_step: Callable[[StepPlan], torch.Tensor],
        owner: Callable[[int], int | None],
        n_slots: int,
        on_token: OnToken | None,
    ):
        self.run_step = run_step
        self.owner = owner
        self.on_token = on_token
        self.free = list(range(n_slots))
        self.active: dict[int, _Request] = {}

    def run(self, requests: list[_Request]) -> None:
        waiting = deque(r for r in requests if not self._finished_before_start(r))
        while waiting or self.active:
            admitted = []
            while waiting and self.free:
                req = waiting.popleft()
                req.slot = _pick_slot(self.free, self.active, self.owner)
                admitted.append(req)
            if admitted:
                self._prefill(admitted)
            if self.active:
                self._decode()

    @staticmethod
    def _finished_before_start(req: _Request) -> bool:
        if req.params.max_new_tokens == 0:
            req.result.finish_reason = "length"
            return True
        return False

    def _prefill(self, admitted: list[_Request]) -> None:
        plan = StepPlan(
            kind="prefill",
            slots=[r.slot for r in admitted],
            tokens=[r.result.prompt_tokens for r in admitted],
            starts=[0] * len(admitted),
        )
        logits = self.run_step(plan)
        for req, row in zip(admitted, logits, strict=True):
            self.active[req.slot] = req
            self._accept(req, row)

    def _decode(self) -> None:
        running = list(self.active.values())
        plan = StepPlan(
            kind="decode",
            slots=[r.slot for r in running],
            tokens=[[r.result.tokens[-1]] for r in running],
            starts=[r.length - 1 for r in running],
        )
        logits = self.run_step(plan)
        for req, row in zip(running, logits, strict=True):
            self._accept(req, row)

    def _accept(self, req: _Request, row: torch.Tensor) -> None:
        """Sample from `row`, record, stream, and retire the request if it is done.

        Whatever this one request raises (sampling, its streaming callback) ends it alone
        with finish_reason "error"; the batch's other requests are not affected."""
        res = req.result
        if res.logits is not None:
            res.logits.append(row.clone())
        try:
            row = constrain_logits(row, req.constraint)
            token = sample_token(row, req.params, req.generator)
            if req.constraint is not None:
                req.constraint.accept(token)
            if token in req.stop_ids:
                self._finish(req, "stop")
                return
            res.tokens.append(token)
            keep = self.on_token is None or self.on_token(req.index, token) is not False
        except Exception as e:  # noqa: BLE001 - see the docstring
            res.error = e
            self._finish(req, "error")
            return
        if not keep:
            self._finish(req, "cancelled")
        elif len(res.tokens) >= req.params.max_new_tokens or req.length >= req.max_len:
            self._finish(req, "length")

    def _finish(self, req: _Request, reason: str) -> None:
        req.result.finish_reason = reason
        del self.active[req.slot]
        self.free.append(req.slot)


def make_requests(
    prompts: list[list[int]],
    params: list[SamplingParams],
    default_stop_ids: tuple[int, ...],
    max_seq_len: int,
    constraints: list[TokenConstraint | None] | None = None,
) -> list[_Request]:
    """One request per prompt (already validated by the engine); `constraints`: one per
    prompt (None: unconstrained)."""
    out = []
    constraints = constraints or [None] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        stop = p.stop_token_ids if p.stop_token_ids is not None else default_stop_ids
        result = GenerationResult(prompt_tokens=list(prompt))
        if p.return_logits:
            result.logits = []
        max_len = min(max_seq_len, len(prompt) + p.max_new_tokens)
        request = _Request(i, p, frozenset(stop), max_len, result, p.generator())
        request.constraint = constraints[i]
        out.append(request)
    return out
