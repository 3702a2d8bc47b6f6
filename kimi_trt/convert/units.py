"""Which source slices make up each stored matrix of a linear target, and whether copying
block-FP8 bytes for them is exact. Worked out from the configs alone, before any weight is read.

A linear target on one rank is one stored matrix (2-D targets) or one per local expert
(the stacked expert tensors). Each such matrix, a *unit*, is its source slices stacked
by rows: `rule_units` lists them for a weight-table rule on one rank.

A block-FP8 matrix decodes row i, column j with the scale of block (i // B, j // B) of
*its own* grid. Copying a source slice's FP8 bytes and scale rows is exact only if every
source block lands on exactly one target block: the slice starts on a block row and a
block column of its source, and at a block row of the unit (`misalignment` says which
condition fails). A slice may end anywhere: a partial last block keeps its scale. When a
unit is misaligned (e.g. up|gate with moe_intermediate_size 96: gate rows 0-31 would
fall in up's first block), the converter decodes the slices and requantises the unit
with fresh scales; `requantisation_plan` names those targets for the summary and manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kimi_trt.config import ModelConfig, WeightFormats
from kimi_trt.convert.hf_layout import linear_shapes
from kimi_trt.convert.weight_table import Rule, format_of, rule_instances
from kimi_trt.mapping import Mapping


@dataclass(frozen=True)
class SliceRef:
    """Rows [r0, r1) x cols [c0, c1) of the HF linear weight `source` (name without .weight)."""

    source: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    shape: tuple[int, int]  # the whole source weight's (out, in)

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def whole_rows(self) -> bool:
        """True when the slice spans every column (its bytes are one contiguous range)."""
        return self.cols == (0, self.shape[1])


Unit = tuple[SliceRef, ...]


def span(n: int, ways: int, index: int) -> tuple[int, int]:
    """The index-th of `ways` equal shares of range(n)."""
    return index * n // ways, (index + 1) * n // ways


def attn_span(mapping: Mapping, rank: int, n: int) -> tuple[int, int]:
    """This rank's share of n rows or columns split over the attention-TP group."""
    return span(n, mapping.attn_tp_size, mapping.attn_tp_rank(rank))


def moe_span(mapping: Mapping, rank: int, n: int) -> tuple[int, int]:
    """This rank's share of an expert's intermediate dimension (split over moe_tp)."""
    return span(n, mapping.moe_tp_size, mapping.moe_tp_rank(rank))


def rule_units(
    rule: Rule, model: ModelConfig, mapping: Mapping, rank: int, layer: int
) -> list[Unit]:
    """The stored matrices of a linear rule's target on `rank`, in file order."""
    shapes = linear_shapes(model)

    def ref(src: str, rows=None, cols=None, expert: int | None = None) -> SliceRef:
        shape = shapes[src]
        name = src.format(E=expert) if expert is not None else src
        return SliceRef(
            f"model.layers.{layer}.{name}", rows or (0, shape[0]), cols or (0, shape[1]), shape
        )

    def split(src: str, dim: int) -> tuple[int, int] | None:
        want = "rows" if dim == 0 else "cols"
        return attn_span(mapping, rank, shapes[src][dim]) if rule.shard == want else None

    if rule.transform in ("copy", "concat_rows"):
        return [tuple(ref(s, split(s, 0), split(s, 1)) for s in rule.sources)]
    experts = mapping.experts_of(rank, model.n_routed_experts)
    inner = moe_span(mapping, rank, model.moe_intermediate_size)
    if rule.transform == "experts_up_gate":
        return [tuple(ref(s, inner, None, e) for s in rule.sources) for e in experts]
    if rule.transform == "experts_down":
        return [(ref(rule.sources[0], None, inner, e),) for e in experts]
    raise ValueError(f"{rule.target}: transform {rule.transform!r} builds no linear units")


def misalignment(unit: Unit, block: tuple[int, int]) -> str | None:
    """Why copying the unit's FP8 blocks would decode some rows with another block's scale
    (None: a byte copy is exact)."""
    offset = 0
    for r in unit:
        name = r.source.split(".", 3)[-1]  # relative to model.layers.L.
        if offset % block[0]:
            return (
                f"{name} starts at row {offset} of the stored matrix, "
                f"inside a {block[0]}-row FP8 block"
            )
        if r.rows[0] % block[0]:
            return f"{name} is split at row {r.rows[0]}, inside a {block[0]}-row FP8 block"
        if r.cols[0] % block[1]:
            return f"{name} is split at column {r.cols[0]}, inside a {block[1]}-column FP8 block"
        offset += r.nrows
    return None


def copies_fp8(rule: Rule, model: ModelConfig, formats: WeightFormats) -> bool:
    """True when the target keeps the checkpoint's FP8 bytes where its blocks allow."""
    return model.is_fp8 and rule.kind == "linear" and format_of(rule, formats) == "fp8_block"


def requantisation_plan(
    model: ModelConfig, mapping: Mapping, formats: WeightFormats
) -> dict[str, str]:
    """fp8_block targets whose blocks do not line up on some rank, so they are requantised
    with fresh scales instead of copied: '<target> (<class>)' -> the first reason found.
    Every layer has the same shapes, so the first layer holding a rule stands for all."""
    out: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for rule, layer in rule_instances(model):
        key = (rule.target, rule.cls)
        if layer is None or key in seen or not copies_fp8(rule, model, formats):
            continue
        seen.add(key)
        for rank in range(mapping.world_size):
            why = next(
                filter(
                    None,
                    (
                        misalignment(u, model.weight_block_size)
                        for u in rule_units(rule, model, mapping, rank, layer)
                    ),
                ),
                None,
            )
            if why:
                out[f"{rule.target} ({rule.cls})"] = f"rank {rank}: {why}"
                break
    return out


def copy_scale_mismatch(unit: Unit, scales: list[np.ndarray], block: tuple[int, int]) -> int:
    """Rows of a verbatim FP8 copy of `unit` that would decode with a scale other than
    their source's: the written scale tensor (the slices' scale rows stacked, as the
    writer stores them) indexed on the unit's own block grid, against each slice's scales
    on its source's grid. The FP8 bytes are the source's, so w' - w = q * (s' - s): zero
    mismatched rows means every copied value equals its source exactly."""
    written = np.concatenate(scales)
    total = sum(r.nrows for r in unit)
    if written.shape[0] != math.ceil(total / block[0]):
        return total
    bad, offset = 0, 0
    for r, own in zip(unit, scales, strict=True):
        i = np.arange(r.nrows)
        mine = written[(offset + i) // block[0]]
        theirs = own[(r.rows[0] + i) // block[0] - r.rows[0] // block[0]]
        bad += r.nrows if mine.shape != theirs.shape else int((mine != theirs).any(axis=1).sum())
        offset += r.nrows
    return bad
