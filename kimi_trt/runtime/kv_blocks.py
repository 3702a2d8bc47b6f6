"""Paged latent-KV bookkeeping on rank 0: fixed-size blocks, reference counts, prefix cache.

Why: the executor's cache is a pool of `block_size`-token blocks per attention owner
(one pool under attention TP, one per rank under attention DP); a sequence holds a block
table instead of a whole max_seq_len slot, so memory follows the tokens really cached and
blocks can be shared. Agent requests repeat one long system + tool-declaration prefix:
every full block of a prompt is registered under the digest of all tokens up to its end
(a chain: the block's tokens and its parent's digest), and a later prompt starting with
the same tokens takes those blocks instead of computing them again.

A shared block is never written: only full prompt blocks are registered, and a match
stops at least one token before the prompt's end, so the newcomer computes (and writes)
from the first position after the matched blocks. Blocks whose last user leaves stay
cached and are reused, least recently released first, only when no free block is left.
Only rank 0 runs this; the other ranks see block ids in the StepPlan.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_ROOT = b"kimi-trt-kv"


def _digest(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("I", tokens).tobytes())
    return h.digest()


@dataclass
class PrefixStats:
    """Counters since the pool was made: prompts looked up, prompts that reused a block,
    prompt tokens looked up and prompt tokens reused."""

    queries: int = 0
    hits: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0


class BlockPool:
    """`n_blocks` blocks of `block_size` tokens with reference counts and a prefix cache."""

    def __init__(self, n_blocks: int, block_size: int, prefix_cache: bool = True):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks ({n_blocks}) and a block size ({block_size})")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * n_blocks
        self._digest_of: dict[int, bytes] = {}  # registered block -> its chain digest
        self._block_of: dict[bytes, int] = {}  # chain digest -> registered block
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unused, oldest first
        self.stats = PrefixStats()

    # ---- state ---------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Blocks held by running sequences (cached idle blocks count as free)."""
        return self.n_blocks - len(self._free) - len(self._idle)

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- sequences -----------------------------------------------------------------
    def cached(self, prompt: list[int]) -> list[int]:
        """The cached blocks holding the longest full-block prefix of `prompt`, leaving at
        least one prompt token to compute (a look-up: nothing is taken or counted)."""
        full = (len(prompt) - 1) // self.block_size if self.prefix_cache else 0
        blocks, parent = [], _ROOT
        for i in range(full):
            parent = _digest(parent, prompt[i * self.block_size : (i + 1) * self.block_size])
            block = self._block_of.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int], prompt_len: int) -> list[int]:
        """Take a reference to each of `blocks` (what `cached` found for a prompt of
        `prompt_len` tokens) for the caller, and count the look-up."""
        for block in blocks:
            self._take(block)
        if self.prefix_cache:
            self.stats.queries += 1
            self.stats.query_tokens += prompt_len
            self.stats.hits += bool(blocks)
            self.stats.hit_tokens += len(blocks) * self.block_size
        return list(blocks)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks (evicting idle cached ones, oldest first); ValueError if the
        pool cannot supply them - the scheduler only asks for what it has reserved."""
        if n > self.available:
            raise ValueError(f"KV pool exhausted: {n} blocks asked, {self.available} left")
        out = []
        for _ in range(n):
            if not self._free:
                self._forget(next(iter(self._idle)))
            block = self._free.pop()
            self._refs[block] = 1
            out.append(block)
        return out

    def register(self, prompt: list[int], table: list[int]) -> None:
        """Record the full blocks of `prompt` (held in `table`) for later prompts to reuse."""
        if not self.prefix_cache:
            return
        parent = _ROOT
        for i in range(len(prompt) // self.block_size):
            parent = _digest(parent, prompt[i * self.block_size : (i + 1) * self.block_size])
            block = table[i]
            if parent in self._block_of or block in self._digest_of:
                continue  # already cached (this prompt matched it, or another copy is)
            self._block_of[parent] = block
            self._digest_of[block] = parent

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block; unregistered blocks become free at once."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._digest_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    # ---- internals -----------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._idle[block]
        self._refs[block] += 1

    def _forget(self, block: int) -> None:
        del self._idle[block]
        del self._block_of[self._digest_of.pop(block)]
        self._free.append(block)
