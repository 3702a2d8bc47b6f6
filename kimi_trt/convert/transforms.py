"""The named transforms of the weight table, applied for one rank.

Each transform yields its target's stored tensor in consecutive parts (consecutive
row-major chunks), so a rank file is written with at most one part in memory.

Linear targets (`copy`, `concat_rows`, `experts_up_gate`, `experts_down` of a linear rule)
are built one stored matrix at a time from `units.rule_units`. A matrix whose FP8 blocks
line up (`units.misalignment`) is copied verbatim from an FP8 checkpoint into fp8_block:
its bytes go to the writer as `FileSlice`s, copied file to file. Every other matrix is
decoded to float32 and re-encoded in row chunks on its own block grid - requantised with
fresh scales when it is block-FP8. The error recorded in `ctx.stats` is measured on what
is written, never assumed: re-encoded chunks are decoded and compared with the source
values; a copied matrix's written scales are compared row by row with its source's
(`units.copy_scale_mismatch`). `TRANSFORMS` maps the names used in
`weight_table.Rule.transform` to these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from kimi_trt.config import ModelConfig, WeightFormats
from kimi_trt.convert import dtypes
from kimi_trt.convert.formats import ErrorStats, decode, encode
from kimi_trt.convert.hf_layout import linear_shapes
from kimi_trt.convert.reader import HFCheckpoint
from kimi_trt.convert.safetensors_io import ST_TO_DTYPE, FileSlice
from kimi_trt.convert.units import (
    Unit,
    attn_span,
    copies_fp8,
    copy_scale_mismatch,
    misalignment,
    rule_units,
)
from kimi_trt.convert.weight_table import Rule, format_of, mla_dtype, vocab_size_padded
from kimi_trt.mapping import Mapping

Stored = np.ndarray | FileSlice
Part = tuple[Stored, Stored | None]  # (stored weight slice, its scale slice)
VOCAB_ROWS_PER_PART = 8192
ENCODE_ROWS = 1024  # rows re-encoded at once (rounded to a multiple of the FP8 block)
ABSORB_HEADS = 1  # heads of fused_q_proj per part: small enough to stay in cache and reuse


@dataclass
class RankContext:
    """What a transform needs to build one rank's tensors, plus the error accumulators."""

    reader: HFCheckpoint
    model: ModelConfig
    mapping: Mapping
    formats: WeightFormats
    rank: int
    stats: dict[str, ErrorStats] = field(default_factory=dict)  # by tensor class
    derived: dict[str, ErrorStats] = field(default_factory=dict)  # by derived target

    @property
    def block(self) -> tuple[int, int]:
        return self.model.weight_block_size or (128, 128)

    def attn_span(self, n: int) -> tuple[int, int]:
        return attn_span(self.mapping, self.rank, n)

    def linear(self, rule: Rule, layer: int) -> Iterator[Part]:
        """A linear target, stored matrix by stored matrix, in its class's format."""
        fmt = format_of(rule, self.formats)
        stats = self.stats.setdefault(rule.cls, ErrorStats())
        copy = copies_fp8(rule, self.model, self.formats)
        for unit in rule_units(rule, self.model, self.mapping, self.rank, layer):
            if copy and misalignment(unit, self.block) is None:
                yield from self._copied(unit, stats)
            else:
                yield from self._encoded(unit, fmt, stats)

    def _copied(self, unit: Unit, stats: ErrorStats) -> Iterator[Part]:
        """The unit's FP8 bytes and scales verbatim, after checking the scale grid."""
        parts = [self.reader.fp8_slice(r.source, r.rows, r.cols) for r in unit]
        bad = copy_scale_mismatch(unit, [s for _, s in parts], self.block)
        if bad:
            raise RuntimeError(
                f"{unit[0].source}: a verbatim FP8 copy would decode {bad} row(s) with another "
                "block's scale (the copy plan is wrong)"
            )
        stats.add_exact(len(unit))
        yield from parts

    def _encoded(self, unit: Unit, fmt: str, stats: ErrorStats) -> Iterator[Part]:
        """The unit decoded and re-encoded in chunks of whole blocks of its own grid;
        each chunk's written value is decoded and measured against its source slices."""
        offsets = list(accumulate((r.nrows for r in unit), initial=0))
        b = self.block[0]
        step = b * max(1, ENCODE_ROWS // b)
        for a in range(0, offsets[-1], step):
            z = min(a + step, offsets[-1])
            pieces = [
                self.reader.values(r.source, (r.rows[0] + lo - o, r.rows[0] + hi - o), r.cols)
                for r, o in zip(unit, offsets, strict=False)
                if (lo := max(a, o)) < (hi := min(z, o + r.nrows))
            ]
            q, scale = encode(np.concatenate(pieces), fmt, self.block)
            got = decode(q, scale, fmt, self.block)
            ends = list(accumulate(len(p) for p in pieces))[:-1]
            for want, back in zip(pieces, np.split(got, ends), strict=True):
                stats.add(want, back)
            yield q, scale


def _base(rule_source: str, layer: int | None) -> str:
    return f"model.layers.{layer}.{rule_source}" if layer is not None else rule_source


def copy(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Norms as-is; linear weights sliced by rows/cols over attention TP (or whole)."""
    if rule.kind == "norm":
        yield _as_dtype(ctx, _base(rule.sources[0], layer), dtypes.bfloat16), None
        return
    yield from ctx.linear(rule, layer)


def linear(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Fusions of linear weights (q_a|kv_a, up|gate, stacked experts): see `units.rule_units`."""
    yield from ctx.linear(rule, layer)


def _as_dtype(ctx: RankContext, name: str, dtype: np.dtype) -> Stored:
    """A whole small tensor in `dtype`: its bytes when the checkpoint stores that dtype."""
    if ST_TO_DTYPE[ctx.reader.tensors[name].dtype] == dtype:
        return ctx.reader.raw_rows(name)
    return ctx.reader.read(name).astype(dtype)


def to_fp32(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    yield _as_dtype(ctx, _base(rule.sources[0], layer), dtypes.float32), None


def absorb_q(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """fused_q_proj of the local heads: per head [Wk_nope^T @ Wq_nope ; Wq_pe], in float32.

    Wq is q_b_proj (input q_lora_rank) or, without q LoRA, q_proj (input hidden_size).
    """
    m = ctx.model
    heads = m.num_attention_heads // ctx.mapping.attn_tp_size
    (q_rows, q_in), (kv_rows, _) = (linear_shapes(m)[s] for s in rule.sources)
    q_base, kv_base = (_base(s, layer) for s in rule.sources)
    wq = ctx.reader.values(q_base, ctx.attn_span(q_rows), (0, q_in))
    wkv = ctx.reader.values(kv_base, ctx.attn_span(kv_rows), (0, m.kv_lora_rank))
    wq = wq.reshape(heads, m.qk_head_dim, q_in)
    wkv = wkv.reshape(heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    nope, kl, dtype = m.qk_nope_head_dim, m.kv_lora_rank, mla_dtype(ctx.formats)
    stats = ctx.derived.setdefault(rule.target, ErrorStats())
    exact = np.empty((kl + m.qk_rope_head_dim, q_in), np.float32)  # one head, reused
    for h in range(0, heads, ABSORB_HEADS):
        stored = np.empty((min(ABSORB_HEADS, heads - h), *exact.shape), dtype)
        for i in range(stored.shape[0]):
            np.matmul(wkv[h + i, :nope].T, wq[h + i, :nope], out=exact[:kl])
            exact[kl:] = wq[h + i, nope:]
            stored[i] = exact
            stats.add(exact, stored[i])  # each head is one piece
        yield stored.reshape(-1, q_in), None


def pad_vocab(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """The rank's rows of the vocab padded to vocab_size_padded (zero rows past V)."""
    src = rule.sources[0]
    if rule.target == "lm_head.weight" and ctx.model.tie_word_embeddings:
        src = "model.embed_tokens.weight"
    v, h = ctx.model.vocab_size, ctx.model.hidden_size
    start, end = ctx.attn_span(vocab_size_padded(ctx.model, ctx.mapping))
    dtype = dtypes.float32 if ctx.formats.embeddings == "fp32" else dtypes.bfloat16
    last = min(end, v)  # rows [start, last) come from the checkpoint
    if start < last and ST_TO_DTYPE[ctx.reader.tensors[src].dtype] == dtype:
        yield ctx.reader.raw_rows(src, (start, last)), None
    else:
        for lo in range(start, last, VOCAB_ROWS_PER_PART):
            hi = min(lo + VOCAB_ROWS_PER_PART, last)
            yield ctx.reader.read(src, (lo, hi)).astype(dtype), None
    if end > v:
        yield np.zeros((end - max(start, v), h), dtype=dtype), None


TRANSFORMS: dict[str, Callable[[RankContext, Rule, int | None], Iterator[Part]]] = {
    "copy": copy,
    "concat_rows": linear,
    "to_fp32": to_fp32,
    "experts_up_gate": linear,
    "experts_down": linear,
    "absorb_q": absorb_q,
    "pad_vocab": pad_vocab,
}
