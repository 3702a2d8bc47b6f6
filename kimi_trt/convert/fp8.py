"""Block-FP8 math: Kimi-K2's weight format and the formats we requantise into.

A weight W [out, in] is stored as e4m3fn bytes Q plus a float32 `weight_scale_inv` S of
shape [ceil(out/B), ceil(in/B)] (B = 128); the real value is Q[i, j] * S[i // B, j // B].
The last block of a dimension may be partial. Quantisation picks S = blockmax / 448 so the
largest element of each block lands on e4m3's largest finite value.

numpy arrays throughout (FP8 and bfloat16 from `ml_dtypes`): the converter must not pay
for importing torch (`kimi_trt.convert.dtypes`). Block operations reshape a (zero-padded
when partial) [.., out, in] array to [.., out/B, B, in/B, B] and broadcast the scales,
instead of materialising a full-size scale matrix.
"""

from __future__ import annotations

import math

import numpy as np

from kimi_trt.convert import dtypes

FP8_MAX = 448.0
FP8_DTYPE = dtypes.float8_e4m3fn
# e4m3fn byte -> float32 value: a table lookup is ~2.5x faster than ml_dtypes' cast.
_FP8_VALUES = np.arange(256, dtype=np.uint8).view(FP8_DTYPE).astype(np.float32)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the block-scale tensor for a weight of `shape` (leading dims kept)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _to_blocks(a: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[.., rows, cols] -> [.., R, B0, C, B1], zero-padded to whole blocks (a view if whole)."""
    rows, cols = a.shape[-2:]
    pr, pc = (-rows) % block[0], (-cols) % block[1]
    if pr or pc:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pr), (0, pc)])
    *lead, r, c = a.shape
    return a.reshape(*lead, r // block[0], block[0], c // block[1], block[1])


def _from_blocks(b: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of `_to_blocks`, cropped back to [.., rows, cols] (contiguous)."""
    *lead, r, b0, c, b1 = b.shape
    return np.ascontiguousarray(b.reshape(*lead, r * b0, c * b1)[..., :rows, :cols])


def _per_block(scale: np.ndarray) -> np.ndarray:
    """Block scales [.., R, C] broadcastable against `_to_blocks` output."""
    return scale.astype(np.float32, copy=False)[..., :, None, :, None]


def dequantize_block(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """FP8 bytes + block scales -> float32 (works on [.., out, in] with leading dims)."""
    rows, cols = q.shape[-2:]
    want = scale_shape(q.shape, block)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)}: expected {want}"
        )
    values = _FP8_VALUES[q.view(np.uint8)] if q.dtype == FP8_DTYPE else q.astype(np.float32)
    blocks = _to_blocks(values, block)
    blocks *= _per_block(scale)
    return _from_blocks(blocks, rows, cols)


def block_amax(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Max |w| per block, partial blocks included: [.., ceil(out/B), ceil(in/B)]."""
    return np.abs(_to_blocks(w.astype(np.float32, copy=False), block)).max(axis=(-3, -1))


def quantize_block(
    w: np.ndarray, block: tuple[int, int] = (128, 128), power_of_two: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """float -> (e4m3fn bytes, float32 scale_inv). `power_of_two` rounds scales up to 2**k
    (UE8M0, Blackwell's block-scale recipe) so no element overflows."""
    amax = block_amax(w, block)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    if power_of_two:
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    rows, cols = w.shape[-2:]
    blocks = _to_blocks(w.astype(np.float32, copy=False), block) / _per_block(scale)
    q = np.clip(_from_blocks(blocks, rows, cols), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 (weight-only): w ~= q * scale[.., out, None]."""
    w = w.astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(w / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale
