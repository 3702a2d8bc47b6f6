"""Weight formats: how one source piece is stored in a per-rank file, and how to read it back.

A `Piece` is a slice of one HF tensor as read: FP8 bytes with their block scales (an FP8
checkpoint) or plain values (a BF16 checkpoint, norms, router). `encode` turns a piece
into the stored tensors of a format; pieces of one target are encoded separately and
concatenated along dim 0, which is exact because every format is row-local (per-channel
scales) or block-local with blocks that never straddle two pieces (the layout check
guarantees 128-aligned boundaries). `decode_weight` is the inverse used by executors.

Formats (docs/per-rank-checkpoint.md):
  fp8_block  e4m3 bytes + fp32 `weight_scale_inv` per 128x128 block, copied exactly
  fp8_ue8m0  same layout, scales rounded up to powers of two (requantised)
  bf16/fp32  dequantised values
  int8_wo    int8 [.., out, in] + fp32 `per_channel_scale` [.., out]: w = q * s[.., out, None]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kimi_trt.convert.fp8 import (
    FP8_DTYPE,
    dequantize_block,
    quantize_block,
    quantize_int8_per_channel,
)


@dataclass
class Piece:
    """One slice of a source tensor: `q` (values or FP8 bytes) and, for FP8, its block scales."""

    source: str
    q: torch.Tensor
    scale: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    def dequantized(self) -> torch.Tensor:
        if self.scale is None:
            return self.q.to(torch.float32)
        return dequantize_block(self.q, self.scale, self.block)


@dataclass
class ErrorStats:
    """Requantisation error of one tensor class: per-piece max ratio and summed magnitudes.

    max_rel = max over pieces of max|w' - w| / max|w|; mean_rel = sum|w' - w| / sum|w|.
    A gathered source tensor therefore satisfies max|w' - w| <= max_rel * max|w|.
    """

    max_rel: float = 0.0
    abs_err_sum: float = 0.0
    abs_sum: float = 0.0
    pieces: int = 0

    def add(self, exact: torch.Tensor, approx: torch.Tensor, pieces_dim0: bool = False) -> None:
        """Account one piece (or, with `pieces_dim0`, each slice along dim 0 as a piece)."""
        if not exact.numel():
            return
        diff = approx.to(torch.float32, copy=True).sub_(exact).abs_()
        mag = exact.abs()
        if not pieces_dim0:
            diff, mag = diff.unsqueeze(0), mag.unsqueeze(0)
        amax = mag.flatten(1).amax(1)
        ratio = diff.flatten(1).amax(1) / amax.clamp_min(torch.finfo(torch.float32).tiny)
        self.max_rel = max(self.max_rel, float(ratio[amax > 0].max()) if (amax > 0).any() else 0.0)
        self.abs_err_sum += float(diff.sum())
        self.abs_sum += float(mag.sum())
        self.pieces += diff.shape[0]

    def merge(self, other: ErrorStats) -> None:
        self.max_rel = max(self.max_rel, other.max_rel)
        self.abs_err_sum += other.abs_err_sum
        self.abs_sum += other.abs_sum
        self.pieces += other.pieces

    def to_json(self) -> dict:
        return {
            "max_rel_err": self.max_rel,
            "mean_rel_err": self.abs_err_sum / self.abs_sum if self.abs_sum else 0.0,
            "pieces": self.pieces,
        }

    def state(self) -> dict:
        return {
            "max_rel": self.max_rel,
            "abs_err_sum": self.abs_err_sum,
            "abs_sum": self.abs_sum,
            "pieces": self.pieces,
        }

    @classmethod
    def from_state(cls, d: dict) -> ErrorStats:
        return cls(d["max_rel"], d["abs_err_sum"], d["abs_sum"], d["pieces"])


def encode(
    piece: Piece, fmt: str, block: tuple[int, int], stats: ErrorStats | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store `piece` in `fmt`: (weight, scale or None). Lossy paths add to `stats`."""
    if fmt == "fp8_block" and piece.scale is not None and piece.block == block:
        return piece.q, piece.scale
    w = piece.dequantized()
    if fmt in ("fp8_block", "fp8_ue8m0"):
        q, s = quantize_block(w, block, power_of_two=fmt == "fp8_ue8m0")
        approx = dequantize_block(q, s, block)
    elif fmt == "int8_wo":
        q, s = quantize_int8_per_channel(w)
        approx = q.to(torch.float32) * s.unsqueeze(-1)
    elif fmt in ("bf16", "fp32", "asis_bf16", "asis_fp32"):
        q, s = w.to(torch.float32 if fmt.endswith("fp32") else torch.bfloat16), None
        approx = q
    else:
        raise ValueError(f"unknown weight format {fmt!r}")
    if stats is not None:
        stats.add(w, approx)
    return q, s


def decode_weight(
    get: Callable[[str], torch.Tensor], name: str, fmt: str, block: tuple[int, int] | None
) -> torch.Tensor:
    """Float32 value of a stored linear weight `name` (ending in '.weight') in format `fmt`.

    `get(tensor_name)` returns a tensor of the rank file (e.g. safe_open(...).get_tensor).
    Works for 2-D weights and stacked 3-D expert weights.
    """
    base = name.removesuffix(".weight")
    q = get(name)
    if fmt in ("fp8_block", "fp8_ue8m0"):
        return dequantize_block(q, get(base + ".weight_scale_inv"), block or (128, 128))
    if fmt == "int8_wo":
        return q.to(torch.float32) * get(base + ".per_channel_scale").unsqueeze(-1)
    if q.dtype == FP8_DTYPE:
        raise ValueError(f"{name}: FP8 tensor but format {fmt!r}")
    return q.to(torch.float32)
