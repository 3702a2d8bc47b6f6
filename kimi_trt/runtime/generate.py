"""The generation loop run by rank 0: continuous batching over seats and paged KV blocks.

Why continuous: requests arrive one by one (a server) while others are generating; each
joins the running loop at its next step instead of waiting for a whole batch to finish.
`GenerationLoop.submit` queues a request; every `step()`:
  1. ends cancelled requests and seats waiting ones while seats are free (a seat bounds
     the batch), taking the cached blocks of the longest prompt prefix already computed
     (kv_blocks.BlockPool); under attention DP each rank has its own pool, and a request
     goes to the rank holding most of its prefix, else to the least loaded one;
  2. builds one StepPlan: a decode token for every running request, then prompt chunks
     of the seated requests still prefilling, oldest first, up to `prefill_chunk` prompt
     tokens - so a long prompt is prefilled over several steps and never stalls decode;
  3. samples for every entry that ended its prompt or decoded, streams the token, and
     retires requests that sampled a stop token, reached max_new_tokens or the cache
     length, or were cancelled (their blocks go back to the pool; full blocks stay cached
     for the next request with the same prefix - the prompt's as soon as it is
     prefilled, the generated tokens' when the request ends, so an agent's next turn,
     whose prompt repeats this one and its answer, reuses both).
Whatever one request's sampling or callbacks raise ends it alone (finish_reason "error");
a failed step (the engine or the multi-rank job broke) ends every request with the error
and is raised to the caller.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kimi_trt.runtime.executor import StepPlan
from kimi_trt.runtime.kv_blocks import BlockPool
from kimi_trt.runtime.sampling import (
    SamplingParams,
    TokenConstraint,
    constrain_logits,
    sample_token,
)

log = logging.getLogger(__name__)

OnToken = Callable[[int, int], "bool | None"]
TokenCallback = Callable[[int], "bool | None"]
DoneCallback = Callable[["GenerationResult | None", "BaseException | None"], None]


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
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass
class GenerationRequest:
    """One prompt to continue, as callers hand it to `GenerationLoop.submit` (any thread
    may build one; only the loop's thread submits it).

    on_token(id) streams each token (returning False cancels); on_done(result, error) is
    called exactly once: with the result (finish_reason stop/length/cancelled) or with the
    error that ended this request. `constraint` (optional) restricts its tokens."""

    prompt: list[int]
    params: SamplingParams
    on_token: TokenCallback | None = None
    on_done: DoneCallback | None = None
    constraint: TokenConstraint | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    """A submitted request inside the loop."""

    request: GenerationRequest
    stop_ids: frozenset[int]
    max_len: int  # prompt + generated tokens may not exceed this (cache length)
    result: GenerationResult
    generator: torch.Generator | None
    slot: int = -1
    pool: BlockPool | None = None
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens (prompt, then generated) whose latents are in the cache

    @property
    def length(self) -> int:
        return len(self.result.prompt_tokens) + len(self.result.tokens)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.result.prompt_tokens)


@dataclass(frozen=True)
class LoopStats:
    """What the loop holds now, and its prefix cache's counters (the serving metrics)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queries: int
    prefix_hits: int
    prefix_query_tokens: int
    prefix_hit_tokens: int


class GenerationLoop:
    """Continuous batching over `n_slots` seats; `pools[owner]` holds each owner's blocks."""

    def __init__(
        self,
        run_step: Callable[[StepPlan], torch.Tensor],
        owner: Callable[[int], int | None],
        n_slots: int,
        pools: dict[int | None, BlockPool],
        default_stop_ids: tuple[int, ...],
        max_seq_len: int,
        prefill_chunk: int,
    ):
        self.run_step = run_step
        self.owner = owner
        self.pools = pools
        self.default_stop_ids = default_stop_ids
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.free = list(range(n_slots))
        self.active: dict[int, _Sequence] = {}  # seat -> sequence, in admission order
        self.waiting: deque[_Sequence] = deque()

    # ---- public ----------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request (validated by the engine); it joins at the next step."""
        p = request.params
        stop = p.stop_token_ids if p.stop_token_ids is not None else self.default_stop_ids
        result = GenerationResult(prompt_tokens=list(request.prompt))
        if p.return_logits:
            result.logits = []
        max_len = min(self.max_seq_len, len(request.prompt) + p.max_new_tokens)
        seq = _Sequence(request, frozenset(stop), max_len, result, p.generator())
        if p.max_new_tokens == 0:
            self._done(seq, "length")
        else:
            self.waiting.append(seq)
        return result

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def stats(self) -> LoopStats:
        pools = list(self.pools.values())
        return LoopStats(
            running=len(self.active),
            waiting=len(self.waiting),
            kv_blocks_used=sum(p.used for p in pools),
            kv_blocks_total=sum(p.n_blocks for p in pools),
            prefix_queries=sum(p.stats.queries for p in pools),
            prefix_hits=sum(p.stats.hits for p in pools),
            prefix_query_tokens=sum(p.stats.query_tokens for p in pools),
            prefix_hit_tokens=sum(p.stats.hit_tokens for p in pools),
        )

    def step(self) -> bool:
        """Admit, run one forward step, sample. False when there was nothing to run."""
        self._drop_cancelled()
        self._admit()
        entries = self._decode_entries() + self._prefill_entries()
        if not entries:
            return False
        seqs = [seq for seq, _ in entries]
        plan = StepPlan(
            slots=[s.slot for s in seqs],
            tokens=[toks for _, toks in entries],
            starts=[s.computed for s in seqs],
            blocks=[list(s.blocks) for s in seqs],
            decode=[not s.prefilling for s in seqs],
        )
        try:
            logits = self.run_step(plan)
        except BaseException as e:
            self.fail_all(e)
            raise
        for (seq, toks), row in zip(entries, logits, strict=True):
            was_prefilling = seq.prefilling
            seq.computed += len(toks)
            if was_prefilling:
                if seq.prefilling:
                    continue  # more chunks to come
                seq.pool.register(seq.result.prompt_tokens, seq.blocks)
            self._accept(seq, row)
        return True

    def fail_all(self, error: BaseException) -> None:
        """End every seated and waiting request with `error` (the engine broke)."""
        for seq in list(self.active.values()) + list(self.waiting):
            self._release(seq)
            seq.result.finish_reason = "error"
            self._notify(seq, None, error)
        self.waiting.clear()

    # ---- scheduling ------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.request.cancelled.is_set()]:
            self.waiting.remove(seq)
            self._done(seq, "cancelled")
        for seq in [s for s in self.active.values() if s.request.cancelled.is_set()]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            prompt = seq.result.prompt_tokens
            hits = {owner: pool.cached(prompt) for owner, pool in self.pools.items()}
            seq.slot = self._pick_slot(hits)
            seq.pool = self.pools[self.owner(seq.slot)]
            seq.blocks = seq.pool.take(hits[self.owner(seq.slot)], len(prompt))
            seq.computed = len(seq.blocks) * seq.pool.block_size
            seq.result.cached_tokens = seq.computed
            self.active[seq.slot] = seq

    def _pick_slot(self, hits: dict[int | None, list[int]]) -> int:
        """The free seat whose owner caches the most of the prompt (`hits`: each owner's
        cached prefix blocks), then runs the fewest requests (lowest seat on ties)."""
        load: dict[int | None, int] = {}
        for s in self.active:
            load[self.owner(s)] = load.get(self.owner(s), 0) + 1
        owner = self.owner
        best = min(self.free, key=lambda s: (-len(hits[owner(s)]), load.get(owner(s), 0), s))
        self.free.remove(best)
        return best

    def _decode_entries(self) -> list[tuple[_Sequence, list[int]]]:
        out = []
        for seq in self.active.values():
            if not seq.prefilling:
                self._cover(seq, seq.length)
                out.append((seq, [seq.result.tokens[-1]]))
        return out

    def _prefill_entries(self) -> list[tuple[_Sequence, list[int]]]:
        out, budget = [], self.prefill_chunk
        for seq in self.active.values():
            if budget == 0:
                break
            if seq.prefilling:
                end = min(len(seq.result.prompt_tokens), seq.computed + budget)
                self._cover(seq, end)
                out.append((seq, seq.result.prompt_tokens[seq.computed : end]))
                budget -= end - seq.computed
        return out

    @staticmethod
    def _cover(seq: _Sequence, length: int) -> None:
        """Grow the sequence's block table to hold positions 0..length-1."""
        missing = seq.pool.blocks_for(length) - len(seq.blocks)
        if missing > 0:
            seq.blocks += seq.pool.allocate(missing)

    # ---- sampling and retiring -------------------------------------------------------
    def _accept(self, seq: _Sequence, row: torch.Tensor) -> None:
        """Sample from `row`, record, stream, and retire the request if it is done.

        Whatever this one request raises (sampling, its streaming callback) ends it alone
        with finish_reason "error"; the batch's other requests are not affected."""
        res, req = seq.result, seq.request
        if res.logits is not None:
            res.logits.append(row.clone())
        try:
            row = constrain_logits(row, req.constraint)
            token = sample_token(row, req.params, seq.generator)
            if req.constraint is not None:
                req.constraint.accept(token)
            if token in seq.stop_ids:
                self._finish(seq, "stop")
                return
            res.tokens.append(token)
            keep = req.on_token is None or req.on_token(token) is not False
        except Exception as e:  # noqa: BLE001 - see the docstring
            res.error = e
            self._finish(seq, "error")
            return
        if not keep:
            self._finish(seq, "cancelled")
        elif len(res.tokens) >= req.params.max_new_tokens or seq.length >= seq.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if self.active.get(seq.slot) is seq:  # its cached tokens, for a later turn to reuse
            written = (seq.result.prompt_tokens + seq.result.tokens)[: seq.computed]
            seq.pool.register(written, seq.blocks)
        self._release(seq)
        self._done(seq, reason)

    def _release(self, seq: _Sequence) -> None:
        if seq.slot >= 0 and self.active.get(seq.slot) is seq:
            del self.active[seq.slot]
            self.free.append(seq.slot)
            seq.pool.release(seq.blocks)
            seq.blocks = []

    def _done(self, seq: _Sequence, reason: str) -> None:
        seq.result.finish_reason = reason
        error = seq.result.error
        if error is not None:
            log.error("request failed: %s: %s", type(error).__name__, error)
        self._notify(seq, None if error is not None else seq.result, error)

    @staticmethod
    def _notify(seq: _Sequence, result, error) -> None:
        if seq.request.on_done is None:
            return
        try:
            seq.request.on_done(result, error)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the loop
            log.exception("a request's done callback failed")
