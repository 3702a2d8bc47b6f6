"""Tensor dtypes of checkpoints, as numpy dtypes (bfloat16 and FP8 from `ml_dtypes`).

The converter works on numpy arrays, never torch: importing torch costs 1-2 s of CPU at
start-up, more than the rest of a conversion's Python work, and nothing in a conversion
needs it (FP8 block math is elementwise arithmetic and one batched matmul). The names
mirror torch's (`dtypes.bfloat16` for `torch.bfloat16`) so tables read the same;
`kimi_trt.torch_bridge` maps them to torch for the executors.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
int8 = np.dtype(np.int8)
uint8 = np.dtype(np.uint8)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)

# safetensors header dtype strings <-> numpy dtypes
ST_TO_DTYPE: dict[str, np.dtype] = {
    "F32": float32,
    "F16": float16,
    "BF16": bfloat16,
    "F8_E4M3": float8_e4m3fn,
    "F8_E5M2": float8_e5m2,
    "I8": int8,
    "U8": uint8,
    "I32": int32,
    "I64": int64,
    "BOOL": bool_,
}
DTYPE_TO_ST: dict[np.dtype, str] = {v: k for k, v in ST_TO_DTYPE.items()}


def as_bytes(a: np.ndarray) -> memoryview:
    """The bytes of `a` in row-major order (a view when `a` is contiguous, else one copy)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
