"""Block-FP8 math: Kimi-K2's weight format and the formats we requantise into.

A weight W [out, in] is stored as e4m3fn bytes Q plus a float32 `weight_scale_inv` S of
shape [ceil(out/B), ceil(in/B)] (B = 128); the real value is Q[i, j] * S[i // B, j // B].
The last block of a dimension may be partial. Quantisation picks S = blockmax / 448 so the
largest element of each block lands on e4m3's largest finite value.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the block-scale tensor for a weight of `shape` (leading dims kept)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def expand_scales(
    scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]
) -> torch.Tensor:
    """Repeat each block scale over its block and crop partial blocks: [.., rows, cols]."""
    s = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., :rows, :cols]


def dequantize_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 bytes + block scales -> float32 (works on [.., out, in] with leading dims)."""
    rows, cols = q.shape[-2:]
    want = scale_shape(q.shape, block)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)}: expected {want}"
        )
    return q.to(torch.float32) * expand_scales(scale.to(torch.float32), rows, cols, block)


def block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Max |w| per block, partial blocks included: [.., ceil(out/B), ceil(in/B)]."""
    rows, cols = w.shape[-2:]
    pr, pc = (-rows) % block[0], (-cols) % block[1]
    a = torch.nn.functional.pad(w.abs().to(torch.float32), (0, pc, 0, pr))
    lead = a.shape[:-2]
    a = a.reshape(*lead, a.shape[-2] // block[0], block[0], a.shape[-1] // block[1], block[1])
    return a.amax(dim=(-3, -1))


def quantize_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """float -> (e4m3fn bytes, float32 scale_inv). `power_of_two` rounds scales up to 2**k
    (UE8M0, Blackwell's block-scale recipe) so no element overflows."""
    amax = block_amax(w, block)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    rows, cols = w.shape[-2:]
    full = expand_scales(scale, rows, cols, block)
    q = (w.to(torch.float32) / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (weight-only): w ~= q * scale[.., out, None]."""
    amax = w.abs().to(torch.float32).amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w.to(torch.float32) / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale
