"""Compile a per-rank checkpoint into TensorRT-LLM engines: one `rank{N}.engine` per rank.

Mirrors `trtllm-build` (`tensorrt_llm/commands/build.py`: `parallel_build`,
`build_and_save`) with our model class: per rank, `KimiK2ForCausalLM.from_checkpoint`,
`tensorrt_llm.builder.build(model, BuildConfig)`, `Engine.save(out)` (which writes
`config.json` with pretrained_config + build_config once, from rank 0, and
`rank{N}.engine`). Ranks are built in parallel, one process per local GPU; under
`mpirun` each MPI process builds the ranks r with r % size == its rank (the output dir
must then be on a filesystem every node sees).

Only `_build_rank` imports tensorrt_llm; everything else here is plain and tested on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kimi_trt.build_context import STATE_DIR
from kimi_trt.config import BuildConfig
from kimi_trt.errors import CheckpointError

ENGINE_CONFIG = "config.json"
TOKENS_PER_BLOCK = 64
# Keys of the checkpoint's `mapping` every TensorRT-LLM 1.x `Mapping.from_dict` accepts.
MAPPING_KEYS = ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size")


def missing_capability() -> str | None:
    """What this host lacks to build engines (None: it can)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def trtllm_pretrained_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config.json as TensorRT-LLM's `PretrainedConfig.from_dict` input.

    `quantization.quant_algo` in the checkpoint is informational (it may say
    MIXED_PRECISION, which TensorRT-LLM would try to read per-layer quant files for);
    the model class derives the real quantization from `kimi_trt.weight_formats`.
    """
    out = dict(raw)
    out["mapping"] = {k: raw["mapping"][k] for k in MAPPING_KEYS}
    out["quantization"] = {"quant_algo": None, "kv_cache_quant_algo": None}
    return out


def build_settings(build: BuildConfig) -> dict[str, Any]:
    """tensorrt_llm.builder.BuildConfig fields and plugin settings from our BuildConfig."""
    lim = build.limits
    timing_cache = build.output_dir / STATE_DIR / "timing.cache"
    return {
        "build_config": {
            "max_batch_size": lim.max_batch_size,
            "max_input_len": lim.max_input_len,
            "max_seq_len": lim.max_seq_len,
            "max_num_tokens": lim.max_num_tokens,
            "max_beam_width": 1,
            "strongly_typed": True,
            # TensorRT's tactic timing cache: kept with the build state (not in the CWD,
            # TensorRT-LLM's default) and reused by every rank and every rebuild.
            "input_timing_cache": str(timing_cache),
            "output_timing_cache": str(timing_cache),
        },
        "plugins": {
            "gpt_attention_plugin": "bfloat16",
            "gemm_plugin": "bfloat16",
            "moe_plugin": "bfloat16",
            "remove_input_padding": True,
            "tokens_per_block": TOKENS_PER_BLOCK,
            # As examples/models/contrib/deepseek_v2/README.md builds MLA engines.
            "use_paged_context_fmha": True,
        },
    }


def trtllm_build_command(ckpt: Path, out: Path, build: BuildConfig) -> list[str]:
    """The equivalent `trtllm-build` command line (for users who drive trtllm-build)."""
    model_file = Path(__file__).with_name("model.py")
    s = build_settings(build)
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt),
        "--output_dir", str(out),
        "--model_cls_file", str(model_file),
        "--model_cls_name", "KimiK2ForCausalLM",
    ]  # fmt: skip
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        cmd += [f"--{key}", str(s["build_config"][key])]
    for key in ("gpt_attention_plugin", "gemm_plugin", "moe_plugin", "tokens_per_block"):
        cmd += [f"--{key}", str(s["plugins"][key])]
    return cmd + ["--use_paged_context_fmha", "enable"]


def rank_assignment(world: int, gpus: int, mpi_rank: int = 0, mpi_size: int = 1) -> dict[int, int]:
    """{engine rank: local GPU} this process builds (trtllm-build's round-robin rule)."""
    if gpus < 1:
        raise ValueError("no GPU to build on")
    mine = [r for r in range(world) if r % mpi_size == mpi_rank]
    if mpi_size > 1:
        return {r: mpi_rank % gpus for r in mine}
    return {r: r % gpus for r in mine}


def prepare_trtllm_checkpoint(ckpt: Path, dest: Path) -> Path:
    """`dest` = the per-rank checkpoint as TensorRT-LLM reads it: our config.json made
    `PretrainedConfig`-ready (`trtllm_pretrained_dict`) next to links to the rank files.
    Our builder and `trtllm-build --checkpoint_dir dest` then load exactly the same thing.
    Idempotent, so every MPI process of a build may call it."""
    raw = json.loads((ckpt / ENGINE_CONFIG).read_text())
    dest.mkdir(parents=True, exist_ok=True)
    text = json.dumps(trtllm_pretrained_dict(raw), indent=2)
    cfg = dest / ENGINE_CONFIG
    if not cfg.is_file() or cfg.read_text() != text:
        tmp = dest / f"{ENGINE_CONFIG}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(cfg)
    for rank in range(raw["mapping"]["world_size"]):
        link = dest / f"rank{rank}.safetensors"
        target = (ckpt / link.name).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(target)
        except FileExistsError:  # another MPI process made the same link
            pass
    return dest


def _build_rank(rank: int, gpu: int, ckpt: str, out: str, settings: dict[str, Any]) -> str:
    """Build and save one rank's engine, as trtllm-build's `build_and_save` does."""
    import torch

    torch.cuda.set_device(gpu)
    from tensorrt_llm.builder import BuildConfig as TrtBuildConfig
    from tensorrt_llm.builder import build
    from tensorrt_llm.models.modeling_utils import PretrainedConfig

    from kimi_trt.trtllm.model import KimiK2ForCausalLM

    config = PretrainedConfig.from_json_file(str(Path(ckpt) / ENGINE_CONFIG))
    model = KimiK2ForCausalLM.from_checkpoint(ckpt, rank=rank, config=config)
    build_config = TrtBuildConfig(**settings["build_config"])
    for key, value in settings["plugins"].items():
        setattr(build_config.plugin_config, key, value)
    engine = build(model, build_config)
    engine.save(out)
    return str(Path(out) / f"rank{rank}.engine")


def _mpi() -> tuple[int, int, Callable[[], None]]:
    """(rank, size, barrier) of an MPI job, or (0, 1, no-op) outside one."""
    from kimi_trt.runtime.launch import detect_rank_info

    info = detect_rank_info()
    if info.world_size == 1:
        return 0, 1, lambda: None
    from mpi4py import MPI

    return info.rank, info.world_size, MPI.COMM_WORLD.Barrier


def compile_engines(ckpt: Path, out: Path, build: BuildConfig, log=print) -> list[Path]:
    """Build every rank's engine of the per-rank checkpoint `ckpt` into `out`."""
    import torch

    from kimi_trt.convert.rank_checkpoint import read_rank_config

    cfg = read_rank_config(ckpt)
    world = cfg.world_size
    ckpt = prepare_trtllm_checkpoint(ckpt, out / STATE_DIR / "trtllm-checkpoint")
    mpi_rank, mpi_size, barrier = _mpi()
    todo = rank_assignment(world, torch.cuda.device_count(), mpi_rank, mpi_size)
    settings = build_settings(build)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[compile] building engine(s) {sorted(todo)} on GPU(s) {sorted(set(todo.values()))}")
    if len(set(todo.values())) <= 1:
        for rank, gpu in todo.items():
            _build_rank(rank, gpu, str(ckpt), str(out), settings)
    else:
        with ProcessPoolExecutor(
            max_workers=len(set(todo.values())), mp_context=get_context("spawn")
        ) as pool:
            futures = [
                pool.submit(_build_rank, r, g, str(ckpt), str(out), settings)
                for r, g in todo.items()
            ]
            for f in futures:
                f.result()
    barrier()
    files = [out / ENGINE_CONFIG] + [out / f"rank{r}.engine" for r in range(world)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"engine build finished without {', '.join(missing)}")
    return files
