"""numpy <-> torch without copies, for the code that runs models on checkpoint tensors.

The converter and the checkpoint readers hold tensors as numpy arrays (bfloat16 and FP8
from `ml_dtypes`, see `kimi_trt.convert.dtypes`) so that a conversion never imports
torch; executors, the reference model and synthetic checkpoints compute in torch. numpy
has no native bfloat16/FP8, so both directions go through a same-width integer view.
"""

from __future__ import annotations

import numpy as np
import torch

from kimi_trt.convert import dtypes

_TORCH: dict[np.dtype, torch.dtype] = {
    dtypes.float32: torch.float32,
    dtypes.float16: torch.float16,
    dtypes.bfloat16: torch.bfloat16,
    dtypes.float8_e4m3fn: torch.float8_e4m3fn,
    dtypes.float8_e5m2: torch.float8_e5m2,
    dtypes.int8: torch.int8,
    dtypes.uint8: torch.uint8,
    dtypes.int32: torch.int32,
    dtypes.int64: torch.int64,
    dtypes.bool_: torch.bool,
}
_NUMPY: dict[torch.dtype, np.dtype] = {v: k for k, v in _TORCH.items()}
_SAME_WIDTH_INT = {1: (np.uint8, torch.uint8), 2: (np.int16, torch.int16)}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return _TORCH[np.dtype(dtype)]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return _NUMPY[dtype]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of the matching dtype (shares memory when contiguous)."""
    t = t.detach().cpu().contiguous()
    want = numpy_dtype(t.dtype)
    if want.kind == "V":  # ml_dtypes' bfloat16 / FP8: numpy cannot take them from torch
        _, torch_int = _SAME_WIDTH_INT[want.itemsize]
        return t.view(torch_int).numpy().view(want)
    return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy array (ml_dtypes bfloat16/FP8 included) as a tensor sharing its memory."""
    a = np.ascontiguousarray(a)
    dtype = torch_dtype(a.dtype)
    if a.dtype.kind == "V":
        np_int, _ = _SAME_WIDTH_INT[a.dtype.itemsize]
        return torch.from_numpy(a.view(np_int)).view(dtype)
    return torch.from_numpy(a)
