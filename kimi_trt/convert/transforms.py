"""The named transforms of the weight table, applied for one rank.

Each transform reads the rank's slices of its HF sources (`HFCheckpoint.piece/read`),
stores them in the target's format and yields the stored tensor in consecutive parts
as consecutive row-major chunks (a part is one source slice, one head or a block of
vocab rows), so a rank file is written with at most one part in memory. A part kept
byte for byte (fp8_block from an FP8 checkpoint, bf16 vocab rows) is yielded as a
`FileSlice` - its source byte range - and copied by the writer without being read here.
`TRANSFORMS` maps the names used in `weight_table.Rule.transform` to these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kimi_trt.config import ModelConfig, WeightFormats
from kimi_trt.convert.formats import ErrorStats, Piece, encode
from kimi_trt.convert.reader import HFCheckpoint
from kimi_trt.convert.safetensors_io import ST_TO_DTYPE, FileSlice
from kimi_trt.convert.weight_table import Rule, format_of, mla_dtype, vocab_size_padded
from kimi_trt.mapping import Mapping

Stored = torch.Tensor | FileSlice
Part = tuple[Stored, Stored | None]  # (stored weight slice, its scale slice)
VOCAB_ROWS_PER_PART = 8192
ENCODE_ROWS = 1024  # rows requantised at once (a multiple of the FP8 block)
ABSORB_HEADS = 8  # heads of fused_q_proj computed at once


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

    def span(self, n: int, ways: int, index: int) -> tuple[int, int]:
        return index * n // ways, (index + 1) * n // ways

    def attn_span(self, n: int) -> tuple[int, int]:
        m = self.mapping
        return self.span(n, m.attn_tp_size, m.attn_tp_rank(self.rank))

    def moe_span(self, n: int) -> tuple[int, int]:
        m = self.mapping
        return self.span(n, m.moe_tp_size, m.moe_tp_rank(self.rank))

    def stored(
        self,
        base: str,
        rule: Rule,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> Iterator[Part]:
        """`base`'s slice in its rule's format: its byte ranges when fp8_block keeps the
        checkpoint's bytes and the slice is whole rows, else read and `encode`d."""
        if format_of(rule, self.formats) == "fp8_block":
            raw = self.reader.raw_piece(base, rows, cols)
            if raw is not None:
                self.stats.setdefault(rule.cls, ErrorStats())  # exact: no error to add
                yield raw
                return
        yield from self.encode(self.reader.piece(base, rows, cols), rule)

    def encode(self, piece: Piece, rule: Rule) -> Iterator[Part]:
        """Store a piece in its rule's format; requantised in row chunks (bounded memory)."""
        fmt = format_of(rule, self.formats)
        stats = self.stats.setdefault(rule.cls, ErrorStats())
        rows_per_block = (piece.block or self.block)[0]
        step = rows_per_block * max(1, ENCODE_ROWS // rows_per_block)
        rows = piece.q.shape[0]
        if rows <= step or (fmt == "fp8_block" and piece.block == self.block):
            yield encode(piece, fmt, self.block, stats)
            return
        for a in range(0, rows, step):
            scale = None
            if piece.scale is not None:
                scale = piece.scale[a // rows_per_block : -(-(a + step) // rows_per_block)]
            sub = Piece(piece.source, piece.q[a : a + step], scale, piece.block)
            yield encode(sub, fmt, self.block, stats)


def _base(rule_source: str, layer: int | None, expert: int | None = None) -> str:
    name = rule_source.format(E=expert) if expert is not None else rule_source
    return f"model.layers.{layer}.{name}" if layer is not None else name


def _dim0_size(ctx: RankContext, base: str) -> int:
    name = base if base in ctx.reader.tensors else base + ".weight"
    return ctx.reader.tensors[name].shape[0]


def _dim1_size(ctx: RankContext, base: str) -> int:
    return ctx.reader.tensors[base + ".weight"].shape[1]


def copy(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Norms as-is; linear weights sliced by rows/cols over attention TP (or whole)."""
    base = _base(rule.sources[0], layer)
    if rule.kind == "norm":
        yield ctx.reader.read(base).to(torch.bfloat16), None
        return
    rows = ctx.attn_span(_dim0_size(ctx, base)) if rule.shard == "rows" else None
    cols = ctx.attn_span(_dim1_size(ctx, base)) if rule.shard == "cols" else None
    yield from ctx.stored(base, rule, rows, cols)


def concat_rows(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Sources stacked on dim 0, each sliced first when the target is split by rows."""
    for src in rule.sources:
        base = _base(src, layer)
        rows = ctx.attn_span(_dim0_size(ctx, base)) if rule.shard == "rows" else None
        yield from ctx.stored(base, rule, rows)


def to_fp32(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    yield ctx.reader.read(_base(rule.sources[0], layer)).to(torch.float32), None


def experts_up_gate(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Per local expert: up rows of this moe_tp rank, then its gate rows ([El, 2Il, H])."""
    rows = ctx.moe_span(ctx.model.moe_intermediate_size)
    for e in ctx.mapping.experts_of(ctx.rank, ctx.model.n_routed_experts):
        for src in rule.sources:
            yield from ctx.stored(_base(src, layer, e), rule, rows)


def experts_down(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """Per local expert: the down_proj columns of this moe_tp rank ([El, H, Il])."""
    cols = ctx.moe_span(ctx.model.moe_intermediate_size)
    for e in ctx.mapping.experts_of(ctx.rank, ctx.model.n_routed_experts):
        yield from ctx.stored(_base(rule.sources[0], layer, e), rule, None, cols)


def absorb_q(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """fused_q_proj of the local heads: per head [Wk_nope^T @ Wq_nope ; Wq_pe], in float32."""
    m = ctx.model
    heads = m.num_attention_heads // ctx.mapping.attn_tp_size
    q_base, kv_base = (_base(s, layer) for s in rule.sources)
    wq = ctx.reader.piece(q_base, ctx.attn_span(m.num_attention_heads * m.qk_head_dim))
    wkv = ctx.reader.piece(
        kv_base, ctx.attn_span(m.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim))
    )
    wq = wq.dequantized().view(heads, m.qk_head_dim, m.q_lora_rank)
    wkv = wkv.dequantized().view(heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    nope, dtype = m.qk_nope_head_dim, mla_dtype(ctx.formats)
    stats = ctx.derived.setdefault(rule.target, ErrorStats())
    for h in range(0, heads, ABSORB_HEADS):
        q, kv = wq[h : h + ABSORB_HEADS], wkv[h : h + ABSORB_HEADS]
        exact = torch.cat([torch.einsum("hdq,hdk->hkq", q[:, :nope], kv[:, :nope]), q[:, nope:]], 1)
        stored = exact.to(dtype)  # [heads in chunk, kl + rope, ql]
        stats.add(exact, stored, pieces_dim0=True)
        yield stored.reshape(-1, m.q_lora_rank), None


def pad_vocab(ctx: RankContext, rule: Rule, layer: int | None) -> Iterator[Part]:
    """The rank's rows of the vocab padded to vocab_size_padded (zero rows past V)."""
    src = rule.sources[0]
    if rule.target == "lm_head.weight" and ctx.model.tie_word_embeddings:
        src = "model.embed_tokens.weight"
    v, h = ctx.model.vocab_size, ctx.model.hidden_size
    start, end = ctx.attn_span(vocab_size_padded(ctx.model, ctx.mapping))
    dtype = torch.float32 if ctx.formats.embeddings == "fp32" else torch.bfloat16
    last = min(end, v)  # rows [start, last) come from the checkpoint
    if start < last and ST_TO_DTYPE[ctx.reader.tensors[src].dtype] == dtype:
        yield ctx.reader.raw_rows(src, (start, last)), None
    else:
        for lo in range(start, last, VOCAB_ROWS_PER_PART):
            hi = min(lo + VOCAB_ROWS_PER_PART, last)
            yield ctx.reader.read(src, (lo, hi)).to(dtype), None
    if end > v:
        yield torch.zeros(end - max(start, v), h, dtype=dtype), None


TRANSFORMS: dict[str, Callable[[RankContext, Rule, int | None], Iterator[Part]]] = {
    "copy": copy,
    "concat_rows": concat_rows,
    "to_fp32": to_fp32,
    "experts_up_gate": experts_up_gate,
    "experts_down": experts_down,
    "absorb_q": absorb_q,
    "pad_vocab": pad_vocab,
}
