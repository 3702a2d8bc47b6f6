"""Loading one rank's file of a per-rank checkpoint into dequantised tensors.

The rank file must hold exactly the tensors the weight table says (names, dtypes,
shapes: `weight_table.rank_tensor_specs`) - checked from the safetensors header before
any weight is read, so a wrong or truncated file fails with one line naming the file and
tensor. Linear weights are decoded from their stored format (`formats.decode_weight`:
block FP8, int8 weight-only, bf16, fp32) into the compute dtype; the executor then runs
plain matmuls (CPU has no FP8 GEMM).
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from tqdm import tqdm

from kimi_trt.convert.formats import decode_weight
from kimi_trt.convert.rank_checkpoint import MANIFEST_NAME, RankCheckpointConfig
from kimi_trt.convert.weight_table import dtype_name, rank_tensor_specs
from kimi_trt.errors import CheckpointError
from kimi_trt.torch_bridge import to_numpy, to_torch


def _check_manifest(cfg: RankCheckpointConfig, rank: int) -> None:
    """The manifest is written last: without it the directory is incomplete."""
    path = cfg.path / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{cfg.path}: no {MANIFEST_NAME} - the conversion did not finish; rerun `kimi-trt convert`"
        )
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: malformed manifest (no 'files' object)") from None
    rank_file = cfg.rank_file(rank)
    want = files.get(rank_file.name, {}).get("bytes")
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: rank file not found")
    got = rank_file.stat().st_size
    if want is not None and got != want:
        raise CheckpointError(
            f"{rank_file}: {got} bytes but the manifest records {want} (truncated or replaced)"
        )


def _check_header(cfg: RankCheckpointConfig, rank: int, f, expected: list) -> None:
    path = cfg.rank_file(rank)
    present = set(f.keys())
    for t in expected:
        if t.name not in present:
            raise CheckpointError(f"{path}: tensor '{t.name}' is missing")
        sl = f.get_slice(t.name)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        want_dtype = dtype_name(t.dtype)
        if shape != t.shape or dtype.lower() not in _dtype_aliases(want_dtype):
            raise CheckpointError(
                f"{path}: tensor '{t.name}' is {dtype} {list(shape)}, expected {want_dtype} {list(t.shape)}"
            )
    extra = present - {t.name for t in expected}
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor '{sorted(extra)[0]}' ({len(extra)} extra)"
        )


def _dtype_aliases(name: str) -> set[str]:
    short = {"float32": "f32", "bfloat16": "bf16", "float8_e4m3fn": "f8_e4m3", "int8": "i8"}
    return {name, short.get(name, name)}


def load_rank_weights(
    cfg: RankCheckpointConfig,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Every tensor of rank{rank}.safetensors by its stored name, decoded to `dtype` on `device`.

    Linear weights are returned under their `.weight` name (scale companions consumed);
    router tensors stay float32 (routing is float32 math).
    """
    _check_manifest(cfg, rank)
    path = cfg.rank_file(rank)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    specs = rank_tensor_specs(cfg.model, cfg.mapping, cfg.formats, rank)
    _check_header(cfg, rank, f, specs)
    out: dict[str, torch.Tensor] = {}
    weights = [t for t in specs if t.role == "weight"]
    for t in tqdm(weights, desc=f"rank {rank} load", disable=not progress, unit="tensor"):
        try:
            if t.rule.kind == "linear":
                fmt = cfg.formats.for_class(t.cls)
                value = to_torch(
                    decode_weight(
                        lambda n: to_numpy(f.get_tensor(n)), t.name, fmt, cfg.weight_block_size
                    )
                )
            else:
                value = f.get_tensor(t.name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor '{t.name}' ({e})") from None
        want = torch.float32 if t.rule.kind == "router" else dtype
        out[t.name] = value.to(device=device, dtype=want)
    return out
