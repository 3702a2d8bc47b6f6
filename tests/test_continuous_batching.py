"""The generation loop at world 1: requests joining a running loop, chunked prefill, the
prefix cache - checked against transformers' DeepseekV3 and against the loop without
chunks or cache (test_runtime_mpi checks the same on every sharded layout)."""

from __future__ import annotations

import pytest
import torch

from kimi_trt.runtime.engine import load_engine
from kimi_trt.runtime.generate import GenerationRequest
from kimi_trt.runtime.sampling import SamplingParams
from kimi_trt.runtime.scheduling import KV_BLOCK_SIZE, Scheduling
from kimi_trt.testing.hf_reference import load_reference_model
from tests.runtime_support import converted, rel_err

LONG = [(13 * i + 5) % 1000 for i in range(KV_BLOCK_SIZE * 3 + 7)]  # 103 tokens


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_token_ids=(), return_logits=True)


@pytest.fixture(scope="module")
def engine_dir(tiny_ckpt, tmp_path_factory):
    return converted(tiny_ckpt, tmp_path_factory.getbasetemp() / "runtime", "w1", attention="fp32")


@pytest.fixture(scope="module")
def plain(engine_dir):
    """One prompt per step, no prefix cache: the loop as it was before chunks and reuse."""
    return load_engine(engine_dir, scheduling=Scheduling(prefill_chunk=4096, prefix_cache=False))


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return load_reference_model(tiny_ckpt)


class Recorder:
    """A request's callbacks: tokens in order, the step each arrived in, the outcome."""

    def __init__(self, clock: list[int]):
        self.clock = clock
        self.tokens: list[int] = []
        self.steps: list[int] = []
        self.result = None

    def request(self, prompt, params) -> GenerationRequest:
        return GenerationRequest(list(prompt), params, self.on_token, self.on_done)

    def on_token(self, token: int) -> None:
        self.tokens.append(token)
        self.steps.append(self.clock[0])

    def on_done(self, result, error) -> None:
        assert error is None
        self.result = result


def run_steps(engine, clock: list[int], n: int | None = None) -> None:
    """Run `n` steps (None: until idle); tokens sampled in step k are stamped k."""
    while n is None or n > 0:
        clock[0] += 1
        if not engine.step():
            clock[0] -= 1
            return
        n = None if n is None else n - 1


def test_chunked_prefill_matches_transformers(engine_dir, plain, ref):
    """A 103-token prompt prefilled 6 tokens a step (18 steps, attention over the cache for
    every chunk after the first; the last chunk is one token) gives transformers' logits
    and greedy continuation."""
    chunked = load_engine(engine_dir, scheduling=Scheduling(prefill_chunk=6))
    got = chunked.generate([LONG], greedy(8))[0]
    full = LONG + got.tokens
    with torch.no_grad():
        want = ref(torch.tensor([full])).logits[0][len(LONG) - 1 : -1]
    assert rel_err(torch.stack(got.logits), want) <= 1e-4
    assert got.tokens == want.argmax(-1).tolist()
    unchunked = plain.generate([LONG], greedy(8))[0]
    assert got.tokens == unchunked.tokens
    assert rel_err(torch.stack(got.logits), torch.stack(unchunked.logits)) <= 1e-5


def test_prefix_cache_reuses_blocks_and_changes_nothing(engine_dir, plain):
    cached = load_engine(engine_dir, scheduling=Scheduling())
    first = cached.generate([LONG + [1, 2, 3]], greedy(6))[0]
    second = cached.generate([LONG + [4, 5]], greedy(6))[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens == 3 * KV_BLOCK_SIZE  # the 3 full blocks of the shared 103
    want = plain.generate([LONG + [4, 5]], greedy(6))[0]
    assert second.tokens == want.tokens
    assert rel_err(torch.stack(second.logits), torch.stack(want.logits)) <= 1e-5
    stats = cached.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (2, 1)
    assert stats.prefix_hit_tokens == 3 * KV_BLOCK_SIZE
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0  # all released


def test_an_agent_turn_reuses_the_previous_turn_and_its_answer(engine_dir, plain):
    """Turn 2's prompt repeats turn 1's prompt and answer: it takes every full block turn 1
    wrote (its 103 prompt tokens and 39 of its 40 generated ones: 4 blocks), and continues
    exactly as without the cache."""
    cached = load_engine(engine_dir, scheduling=Scheduling())
    first = cached.generate([LONG], greedy(40))[0]
    turn2 = LONG + first.tokens + [7, 8, 9]
    second = cached.generate([turn2], greedy(5))[0]
    assert second.cached_tokens == 4 * KV_BLOCK_SIZE
    want = plain.generate([turn2], greedy(5))[0]
    assert second.tokens == want.tokens
    assert rel_err(torch.stack(second.logits), torch.stack(want.logits)) <= 1e-5


def test_a_request_joins_the_running_loop_at_the_next_step(plain):
    """B, submitted while A decodes, gets its first token one step later, finishes first,
    and both continue exactly as they do alone."""
    clock = [0]
    a, b = Recorder(clock), Recorder(clock)
    plain.submit(a.request([5, 17, 300, 42], greedy(24)))
    run_steps(plain, clock, 5)
    submitted_at = clock[0]
    plain.submit(b.request([11, 12, 13], greedy(4)))
    run_steps(plain, clock)
    assert b.steps[0] == submitted_at + 1
    assert b.steps[-1] < a.steps[-1]
    assert a.result.tokens == plain.generate([[5, 17, 300, 42]], greedy(24))[0].tokens
    assert b.result.tokens == plain.generate([[11, 12, 13]], greedy(4))[0].tokens


def test_a_long_prompt_is_chunked_while_running_requests_keep_decoding(engine_dir):
    chunked = load_engine(engine_dir, scheduling=Scheduling(prefill_chunk=8))
    clock = [0]
    a, b = Recorder(clock), Recorder(clock)
    chunked.submit(a.request([5, 17, 300, 42], greedy(30)))
    run_steps(chunked, clock, 2)
    chunked.submit(b.request(LONG, greedy(2)))
    run_steps(chunked, clock)
    prefill_steps = -(-len(LONG) // 8)  # 13
    assert b.steps[0] == 2 + prefill_steps
    # A got a token at every step while B was prefilling
    assert a.steps[: 2 + prefill_steps] == list(range(1, 3 + prefill_steps))


def test_waiting_and_prefilling_requests_can_be_cancelled(engine_dir):
    """One seat: B waits behind A and is cancelled there; C is cancelled mid-prefill. The
    seat and every block come back."""
    engine = load_engine(
        engine_dir, max_batch_size=1, scheduling=Scheduling(prefill_chunk=8, prefix_cache=False)
    )
    clock = [0]
    a, b, c = Recorder(clock), Recorder(clock), Recorder(clock)
    req_b = b.request([11, 12, 13], greedy(4))
    engine.submit(a.request([5, 17, 300], greedy(3)))
    engine.submit(req_b)
    run_steps(engine, clock, 1)
    assert engine.stats().waiting == 1
    req_b.cancel()
    run_steps(engine, clock)
    assert a.result.finish_reason == "length" and len(a.tokens) == 3
    assert b.result.finish_reason == "cancelled" and b.tokens == []
    req_c = c.request(LONG, greedy(4))
    engine.submit(req_c)
    run_steps(engine, clock, 3)
    assert engine.stats().kv_blocks_used > 0 and c.tokens == []
    req_c.cancel()
    run_steps(engine, clock)
    assert c.result.finish_reason == "cancelled"
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0


def test_prompts_longer_than_the_seat_count_share_the_pool(engine_dir, plain):
    """More requests than seats: they queue, take seats as others leave, same tokens."""
    engine = load_engine(engine_dir, max_batch_size=2)
    prompts = [[i + 1, 2 * i + 3, 5] for i in range(5)]
    got = engine.generate(prompts, greedy(6))
    for prompt, res in zip(prompts, got, strict=True):
        assert res.tokens == plain.generate([prompt], greedy(6))[0].tokens
