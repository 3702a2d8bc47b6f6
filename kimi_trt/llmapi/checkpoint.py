"""Backend llmapi's convert stage: check the HF checkpoint, optionally requantise to UE8M0.

TensorRT-LLM's PyTorch backend reads the Hugging Face checkpoint itself, so there is
nothing to convert - but everything the converter checks before reading a weight still
applies and is far cheaper to learn here than on a GPU host an hour into loading: every
shard present and not truncated, every tensor the config implies present with its dtype
and shape, FP8 block scales of the right shape and finite and positive
(`convert.reader.HFCheckpoint.open` + `check_scales`, the converter's own checks).

With `fp8_ue8m0` weights (Blackwell's recipe: power-of-two block scales, which DeepGEMM
on SM100 wants) the build writes a copy of the checkpoint whose FP8 weights are
requantised with UE8M0 scales (`fp8.quantize_block(power_of_two=True)`) and reports the
error per tensor class, instead of leaving the rounding unmeasured inside the loader.
One source shard is held in memory at a time.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kimi_trt.config import ModelConfig
from kimi_trt.convert.formats import ErrorStats
from kimi_trt.convert.fp8 import FP8_DTYPE, dequantize_block, quantize_block
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.convert.reader import INDEX_NAME, HFCheckpoint
from kimi_trt.output_dirs import replacing, write_json_atomic
from kimi_trt.torch_bridge import to_torch

UE8M0_DIR = "checkpoint-ue8m0"
SCALE_SUFFIX = "_scale_inv"


def check_checkpoint(path: Path, model: ModelConfig) -> tuple[HFCheckpoint, dict[str, Any]]:
    """The converter's header, shape and scale checks; (reader, summary for the build log)."""
    reader, unknown = HFCheckpoint.open(path, model)
    if reader.block is not None:
        reader.check_scales()
    files = sorted({t.file for t in reader.tensors.values()})
    return reader, {
        "tensors": len(reader.tensors),
        "files": len(files),
        "bytes": reader.source_bytes,
        "unknown_tensors": unknown,
    }


def _requantize_file(
    reader: HFCheckpoint, file: str, classes: dict[str, str], stats: dict[str, ErrorStats]
) -> dict[str, torch.Tensor]:
    """Every tensor of one shard, FP8 weights (and their scales) requantised to UE8M0."""
    out: dict[str, torch.Tensor] = {}
    for name, info in sorted(reader.tensors.items()):
        if info.file != file or name.endswith(SCALE_SUFFIX):
            continue
        value = reader.read(name)
        scale_name = name + SCALE_SUFFIX
        if value.dtype == FP8_DTYPE and scale_name in reader.tensors:
            exact = dequantize_block(value, reader.read(scale_name), reader.block)
            q, s = quantize_block(exact, reader.block, power_of_two=True)
            stats[classes.get(name, "other")].add(exact, dequantize_block(q, s, reader.block))
            out[name], out[scale_name] = to_torch(q), to_torch(s)
        else:
            out[name] = to_torch(value)
    return out


def requantize_ue8m0(
    reader: HFCheckpoint, out: Path, log: Callable[[str], None]
) -> tuple[list[Path], dict[str, Any]]:
    """Write `out`: the checkpoint with UE8M0 block scales (each scale beside its weight,
    a new index), every other file copied. Returns (files written, error per class).

    Every file is written to a temp name and renamed (`output_dirs.replacing`), and the
    index - what makes the directory a loadable checkpoint - is removed first and written
    last: an interrupted build (killed, disk full) leaves no file that is partly written
    and no index over a mix of shards, so neither TensorRT-LLM nor a rerun takes it for a
    result."""
    out.mkdir(parents=True, exist_ok=True)
    index = out / INDEX_NAME
    index.unlink(missing_ok=True)
    classes = {t.name: t.cls for t in hf_tensors(reader.model)}
    stats: dict[str, ErrorStats] = defaultdict(ErrorStats)
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    for file in sorted({t.file for t in reader.tensors.values()}):
        tensors = _requantize_file(reader, file, classes, stats)
        with replacing(out / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        written.append(out / file)
        weight_map.update(dict.fromkeys(tensors, file))
        log(f"[convert] {file}: {len(tensors)} tensors requantised to UE8M0 scales")
    for src in sorted(reader.path.iterdir()):
        if src.is_file() and src.suffix != ".safetensors" and src.name != INDEX_NAME:
            with replacing(out / src.name) as tmp:
                shutil.copy2(src, tmp)
            written.append(out / src.name)
    write_json_atomic(index, {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    written.append(index)
    return written, {cls: s.to_json() for cls, s in sorted(stats.items())}
