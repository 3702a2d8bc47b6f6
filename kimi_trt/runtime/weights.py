"""Loading one rank's file of a per-rank checkpoint into dequantised tensors.

The rank file must have the size and checksum its manifest records (verified once per
change of the file: `integrity`) and hold exactly the tensors the weight table says
(names, dtypes, shapes: `weight_table.rank_tensor_specs`) under a valid header
(`safetensors_header`) - all checked before any weight is read, so a corrupt, wrong or
truncated file fails with one line naming the file and tensor. Linear weights are decoded from their stored format (`formats.decode_weight`:
block FP8, int8 weight-only, bf16, fp32) into the compute dtype; the executor then runs
plain matmuls (CPU has no FP8 GEMM).
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from tqdm import tqdm

from kimi_trt.checksum import manifest_algorithm
from kimi_trt.convert.formats import decode_weight
from kimi_trt.convert.manifest import manifest_files
from kimi_trt.convert.rank_checkpoint import (
    MANIFEST_NAME,
    RankCheckpointConfig,
    check_rank_header,
)
from kimi_trt.convert.weight_table import rank_tensor_specs
from kimi_trt.errors import CheckpointError
from kimi_trt.json_files import read_json
from kimi_trt.runtime.integrity import verify_file
from kimi_trt.torch_bridge import to_numpy, to_torch


def _check_manifest(cfg: RankCheckpointConfig, rank: int, verify_checksum: bool) -> None:
    """The manifest is written last: without it the directory is incomplete. The rank file
    must have the size and checksum it records (`integrity.verify_file`)."""
    path = cfg.path / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{cfg.path}: no {MANIFEST_NAME} - the conversion did not finish; rerun `kimi-trt convert`"
        )
    manifest = read_json(path, CheckpointError)
    files = manifest_files(path, manifest)
    rank_file = cfg.rank_file(rank)
    if rank_file.name not in files:
        raise CheckpointError(f"{path}: no entry for {rank_file.name}")
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: rank file not found")
    want, got = files[rank_file.name]["bytes"], rank_file.stat().st_size
    if got != want:
        raise CheckpointError(
            f"{rank_file}: {got} bytes but the manifest records {want} (truncated or replaced)"
        )
    if verify_checksum:
        algorithm = manifest_algorithm(manifest)
        verify_file(rank_file, algorithm, files[rank_file.name][algorithm])


def load_rank_weights(
    cfg: RankCheckpointConfig,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = False,
    verify_checksum: bool = True,
) -> dict[str, torch.Tensor]:
    """Every tensor of rank{rank}.safetensors by its stored name, decoded to `dtype` on `device`.

    Linear weights are returned under their `.weight` name (scale companions consumed);
    router tensors stay float32 (routing is float32 math). `verify_checksum=False` is for a
    caller that has just hashed the files itself (`kimi-trt verify`).
    """
    _check_manifest(cfg, rank, verify_checksum)
    check_rank_header(cfg, rank)
    path = cfg.rank_file(rank)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors' own error types (the header was checked above)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    specs = rank_tensor_specs(cfg.model, cfg.mapping, cfg.formats, rank)
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
