"""Weight formats: how float values are stored in a per-rank file, and how to read them back.

`encode` turns float32 rows of one stored matrix into the tensors of a format and `decode`
is its exact inverse; the converter measures every lossy write by decoding what it
encoded (`ErrorStats`), and `decode_weight` is what executors call on a rank file.
Block formats quantise on the stored matrix's own 128-row grid, so rows are encoded in
chunks that start on block rows of that matrix (kimi_trt/convert/units.py explains when
the checkpoint's FP8 bytes can be copied instead).

Formats (docs/per-rank-checkpoint.md):
  fp8_block  e4m3 bytes + fp32 `weight_scale_inv` per 128x128 block (copied where the
             blocks line up, else requantised)
  fp8_ue8m0  same layout, scales rounded up to powers of two (requantised)
  bf16/fp32  dequantised values
  int8_wo    int8 [.., out, in] + fp32 `per_channel_scale` [.., out]: w = q * s[.., out, None]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kimi_trt.convert import dtypes
from kimi_trt.convert.fp8 import (
    FP8_DTYPE,
    dequantize_block,
    quantize_block,
    quantize_int8_per_channel,
)


@dataclass
class ErrorStats:
    """Measured error of one tensor class: per-piece max ratio and summed magnitudes.

    A piece is a slice of one source tensor as written; w is its source value, w' the
    decoded stored value. max_rel = max over pieces of max|w' - w| / max|w|, so a gathered
    source tensor satisfies max|w' - w| <= max_rel * max|w|. mean_rel = sum|w' - w| /
    sum|w| over the re-encoded pieces (pieces copied byte for byte add none).
    """

    max_rel: float = 0.0
    abs_err_sum: float = 0.0
    abs_sum: float = 0.0
    pieces: int = 0

    def add(self, exact: np.ndarray, approx: np.ndarray, pieces_dim0: bool = False) -> None:
        """Account one piece (or, with `pieces_dim0`, each slice along dim 0 as a piece)."""
        if not exact.size:
            return
        n = exact.shape[0] if pieces_dim0 else 1
        exact = exact.reshape(n, -1)
        diff = approx.reshape(n, -1).astype(np.float32)  # one scratch array, reused below
        diff -= exact
        np.abs(diff, out=diff)
        amax = np.maximum(exact.max(axis=1), -exact.min(axis=1))
        ratio = diff.max(axis=1) / np.maximum(amax, np.finfo(np.float32).tiny)
        self.max_rel = max(self.max_rel, float(ratio[amax > 0].max()) if (amax > 0).any() else 0.0)
        self.abs_err_sum += float(diff.sum())
        self.abs_sum += float(np.abs(exact, out=diff).sum())
        self.pieces += n

    def add_exact(self, pieces: int) -> None:
        """Account pieces whose decoded value was shown equal to the source (zero error)."""
        self.pieces += pieces

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


def encode(w: np.ndarray, fmt: str, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Store float values `w` [.., rows, cols] in `fmt`: (weight, scale or None)."""
    if fmt in ("fp8_block", "fp8_ue8m0"):
        return quantize_block(w, block, power_of_two=fmt == "fp8_ue8m0")
    if fmt == "int8_wo":
        return quantize_int8_per_channel(w)
    if fmt in ("bf16", "fp32"):
        return w.astype(dtypes.float32 if fmt == "fp32" else dtypes.bfloat16), None
    raise ValueError(f"unknown weight format {fmt!r}")


def decode(
    q: np.ndarray, scale: np.ndarray | None, fmt: str, block: tuple[int, int] | None
) -> np.ndarray:
    """Float32 value of a stored weight (and its scale) in `fmt`: the inverse of `encode`."""
    if fmt in ("fp8_block", "fp8_ue8m0"):
        return dequantize_block(q, scale, block or (128, 128))
    if fmt == "int8_wo":
        return q.astype(np.float32) * scale[..., None]
    if q.dtype == FP8_DTYPE:
        raise ValueError(f"FP8 tensor but format {fmt!r}")
    return q.astype(np.float32)


def decode_weight(
    get: Callable[[str], np.ndarray], name: str, fmt: str, block: tuple[int, int] | None
) -> np.ndarray:
    """Float32 value of a stored linear weight `name` (ending in '.weight') in format `fmt`.

    `get(tensor_name)` returns a tensor of the rank file as a numpy array.
    Works for 2-D weights and stacked 3-D expert weights.
    """
    base = name.removesuffix(".weight")
    scale = None
    if fmt in ("fp8_block", "fp8_ue8m0"):
        scale = get(base + ".weight_scale_inv")
    elif fmt == "int8_wo":
        scale = get(base + ".per_channel_scale")
    try:
        return decode(get(name), scale, fmt, block)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
