"""BlockPool: block tables, reference counts and the prefix cache's rules (kv_blocks.py)."""

from __future__ import annotations

import pytest

from kimi_trt.runtime.kv_blocks import BlockPool

BS = 4


def match(pool: BlockPool, prompt: list[int]) -> list[int]:
    """Take the prompt's cached prefix blocks, as the loop does when it seats a request."""
    return pool.take(pool.cached(prompt), len(prompt))


def seq(pool: BlockPool, prompt: list[int]) -> list[int]:
    """A sequence's table as the loop builds it: cached prefix blocks, then fresh ones."""
    table = match(pool, prompt)
    table += pool.allocate(pool.blocks_for(len(prompt)) - len(table))
    return table


def test_full_prompt_blocks_are_reused_and_one_token_is_left_to_compute():
    pool = BlockPool(16, BS)
    a = list(range(10))  # blocks [0-3] [4-7] full, [8, 9] partial
    ta = seq(pool, a)
    pool.register(a, ta)
    b = list(range(8)) + [50, 51, 52]
    assert match(pool, b) == ta[:2]
    # exactly two full blocks: the last block is recomputed so the last token has logits
    assert pool.cached(list(range(8))) == ta[:1]
    assert pool.stats.hits == 1 and pool.stats.hit_tokens == 8


def test_a_block_matches_only_after_the_same_prefix():
    pool = BlockPool(16, BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pool.register(a, seq(pool, a))
    assert pool.cached([9, 9, 9, 9, 5, 6, 7, 8, 9]) == []  # same second block, other first
    assert len(pool.cached([1, 2, 3, 4, 5, 6, 7, 8, 0])) == 2


def test_shared_blocks_stay_until_their_last_user_leaves_then_idle_ones_are_evicted_oldest_first():
    pool = BlockPool(6, BS)
    a = list(range(9))
    ta = seq(pool, a)  # 3 blocks
    pool.register(a, ta)
    tb = seq(pool, list(range(8)) + [99])  # takes a's 2 full blocks, 1 fresh
    assert tb[:2] == ta[:2] and pool.used == 4
    pool.release(ta)
    assert pool.used == 3  # a's partial block is free; its full blocks are still b's
    pool.release(tb)
    assert pool.used == 0 and pool.available == 6
    # 4 free blocks, 2 idle cached: asking for 5 evicts the oldest idle one (a's first)
    fresh = pool.allocate(5)
    assert ta[0] in fresh and ta[1] not in fresh
    assert pool.cached(a) == []  # the chain starts at the evicted block
    with pytest.raises(ValueError, match="exhausted"):
        pool.allocate(2)


def test_a_prompt_computed_twice_registers_one_copy():
    pool = BlockPool(8, BS)
    a = list(range(5))
    t1, t2 = seq(pool, a), seq(pool, a)  # both prefilled before either registered
    pool.register(a, t1)
    pool.register(a, t2)
    pool.release(t1)
    pool.release(t2)
    assert pool.available == 8 and pool.cached(a) == [t1[0]]


def test_prefix_cache_off_never_matches():
    pool = BlockPool(8, BS, prefix_cache=False)
    a = list(range(9))
    pool.register(a, seq(pool, a))
    assert match(pool, a) == [] and pool.stats.queries == 0
