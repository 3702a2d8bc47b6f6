"""The LLM-API options an engine dir of backend `llmapi` carries, and their check.

`llm_api_options(build)` turns a build YAML into the keyword arguments of TensorRT-LLM's
`LLM(...)` / `TorchLlmArgs` - the same dict `trtllm-serve MODEL --extra_llm_api_options
FILE` reads - so one file drives our runtime, `trtllm-serve` and Triton's `llmapi` model
alike. Every key and every enumerated value is checked against the field names of the
pinned TensorRT-LLM, stored in `assets/tensorrt_llm_llmapi_fields.json` (which names the
file and class each list was read from), so a misspelt or removed option fails the build
here, not an hour later on a GPU host.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kimi_trt.config import BuildConfig
from kimi_trt.errors import ConfigError
from kimi_trt.output_dirs import replacing

FIELDS_FILE = Path(__file__).resolve().parent.parent / "assets" / "tensorrt_llm_llmapi_fields.json"
OPTIONS_FILE = "llm_api_options.yaml"
# Nested option objects and the TensorRT-LLM class that defines their keys.
NESTED = {
    "kv_cache_config": "KvCacheConfig",
    "moe_config": "MoeConfig",
    "cuda_graph_config": "CudaGraphConfig",
    "attention_dp_config": "AttentionDpConfig",
}
# Options whose values are enumerated in the pinned source (checked against FIELDS_FILE).
ENUMERATED = {
    ("moe_config", "backend"): "MoeConfig.backend",
    ("kv_cache_config", "dtype"): "KvCacheConfig.dtype",
    ("backend",): "TorchLlmArgs.backend",
}


@lru_cache(maxsize=1)
def pinned_fields() -> dict[str, Any]:
    """The stored field lists of the pinned TensorRT-LLM (see FIELDS_FILE's 'sources')."""
    return json.loads(FIELDS_FILE.read_text())


def kv_cache_dtype(build: BuildConfig) -> str:
    """KvCacheConfig.dtype: 'fp8' for an FP8 cache, 'auto' (the model's bf16) otherwise."""
    return "fp8" if build.kv_cache_dtype == "fp8" else "auto"


def llm_api_options(build: BuildConfig) -> dict[str, Any]:
    """TorchLlmArgs keyword arguments for this build (model path not included: the caller
    passes it, as trtllm-serve takes MODEL on its command line)."""
    p, lim, s = build.parallelism, build.limits, build.llm_api
    return {
        "backend": "pytorch",
        "tensor_parallel_size": p.tp,
        "pipeline_parallel_size": p.pp,
        "moe_expert_parallel_size": p.ep,
        "moe_tensor_parallel_size": p.moe_tp,
        "enable_attention_dp": p.attention_dp,
        "max_batch_size": lim.max_batch_size,
        "max_input_len": lim.max_input_len,
        "max_seq_len": lim.max_seq_len,
        "max_num_tokens": lim.max_num_tokens,
        "trust_remote_code": True,  # Kimi-K2's tokenizer is the checkpoint's tokenization_kimi.py
        "kv_cache_config": {
            "dtype": kv_cache_dtype(build),
            "free_gpu_memory_fraction": build.kv_cache_free_gpu_mem_fraction,
        },
        "cuda_graph_config": {
            "enable_padding": s.cuda_graph_padding,
            "max_batch_size": s.cuda_graph_max_batch_size or lim.max_batch_size,
        },
        "moe_config": {"backend": s.moe_backend},
        "stream_interval": s.stream_interval,
    }


def option_problems(options: dict[str, Any]) -> list[str]:
    """Keys or enumerated values the pinned TensorRT-LLM does not define (empty: all known)."""
    pinned = pinned_fields()
    classes, values = pinned["classes"], pinned["values"]
    top = set(classes["BaseLlmArgs"]) | set(classes["TorchLlmArgs"]) | {"model"}
    out = [f"{k}: not a TorchLlmArgs field of {pinned['pinned']}" for k in options if k not in top]
    for key, cls in NESTED.items():
        sub = options.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            out.append(f"{key}: expected a mapping of {cls} fields, got {sub!r}")
            continue
        out += [f"{key}.{k}: not a {cls} field" for k in sub if k not in classes[cls]]
    for path, name in ENUMERATED.items():
        value: Any = options
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and value not in values[name]:
            out.append(f"{'.'.join(path)}: {value!r} is not one of {values[name]} ({name})")
    return out


def check_options(options: dict[str, Any], where: str) -> None:
    """ConfigError naming `where` and the first unknown key or value."""
    problems = option_problems(options)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def write_options(path: Path, options: dict[str, Any], header: str) -> Path:
    """The options as YAML (trtllm-serve's --extra_llm_api_options format), atomically."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(options, sort_keys=False)
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def read_options(path: Path) -> dict[str, Any]:
    """An options file, checked (one-line ConfigError naming the file when it is not: also
    for bytes that are not UTF-8, YAML nested deep enough to exhaust PyYAML's recursion and
    YAML errors, whose text spans lines - as `config.load_build_config` reads build YAML)."""
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read LLM-API options ({e.strerror})") from None
    except yaml.YAMLError as e:  # its str() spans several lines: keep the line and problem
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of TorchLlmArgs options")
    check_options(raw, str(path))
    return raw
