"""The engine dir `kimi-trt build` leaves: its layout, and recognising one.

(`kimi_trt.inspect` describes it; this module stays below every reader of engine dirs.)

Layout (written by kimi_trt.build_stages):
    config.json          backend trtllm: TensorRT-LLM's engine config (version,
                         pretrained_config, build_config); backend torch: the per-rank
                         checkpoint's config.json
    rank{N}.engine       backend trtllm, one per rank
    rank{N}.safetensors  backend torch, the per-rank checkpoint (hard links)
    llm_api_options.yaml backend llmapi: TensorRT-LLM TorchLlmArgs options (trtllm-serve's
                         --extra_llm_api_options file); config.json then holds backend
                         "llmapi", the checkpoint it runs, world size, limits, hf_config
    tiktoken.model, tokenizer_config.json, ...   copied from tokenizer_dir
    manifest.json        kind kimi_trt.engine_dir: backend, layout, formats, limits and the
                         checksum of every file above (XXH3-128, named in
                         checksum_algorithm); written last (absent: incomplete)
    checkpoint/          the converter's per-rank checkpoint (kept for resume/rebuilds)
    checkpoint-ue8m0/    backend llmapi with fp8_ue8m0 weights: the requantised HF checkpoint
    .kimi-build/         the build's stage state and plan
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kimi_trt.json_files import read_json_or

ENGINE_FORMAT = "kimi_trt.engine_dir"
MANIFEST = "manifest.json"
ENGINE_CONFIG = "config.json"
LLMAPI_BACKEND = "llmapi"
ENGINE_FILE = re.compile(r"rank(\d+)\.engine")


def read_engine_manifest(path: Path) -> dict[str, Any] | None:
    """The engine manifest of `path`, or None if it has none (or another kind of manifest)."""
    p = Path(path) / MANIFEST
    data = read_json_or(p, None) if p.is_file() else None
    return data if isinstance(data, dict) and data.get("kind") == ENGINE_FORMAT else None


def is_engine_dir(path: Path) -> bool:
    path = Path(path)
    return read_engine_manifest(path) is not None or any(
        ENGINE_FILE.fullmatch(p.name) for p in path.glob("rank*.engine")
    )


def is_llmapi_dir(path: Path) -> bool:
    """An engine dir of backend llmapi: config.json says so."""
    data = read_json_or(Path(path) / ENGINE_CONFIG, None)
    return isinstance(data, dict) and data.get("backend") == LLMAPI_BACKEND
