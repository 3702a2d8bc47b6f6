"""`kimi-trt triton-repo`: a Triton model repository for an engine dir.

Three kinds of engine dir, three repositories:

- TensorRT-LLM engines (`rank{N}.engine` + config.json with pretrained_config and
  build_config): tensorrtllm_backend's inflight-batching layout - `preprocessing`
  (text -> ids with our KimiTokenizer), `tensorrt_llm` (the C++ backend, every parameter
  filled from the engine's config), `postprocessing` (ids -> text) and `ensemble`
  chaining them (triton_trtllm_models.py).
- backend llmapi (TensorRT-LLM's PyTorch backend): tensorrtllm_backend's `llmapi` layout,
  one `tensorrt_llm` model with config.pbtxt, 1/model.py and 1/model.yaml
  (serving/triton_llmapi.py).
- torch-executor engine dirs (a per-rank checkpoint): `kimi`, a decoupled Python-backend
  model running our runtime with request batching (streams tokens), and `kimi_sync`, a
  non-decoupled wrapper over it (BLS) for clients that cannot stream, such as Triton's
  HTTP `infer`.

The Python models live in kimi_trt (serving/triton_models.py); each repository model
gets a small generated `model.py` that puts this installation's kimi_trt and
site-packages on sys.path, because Triton's Python stub runs the base interpreter, not
our virtual environment. Deployed elsewhere (NVIDIA's Triton container on a GPU host),
`pip install kimi_trt` there: paths that do not exist are harmless, and the engine and
tokenizer paths in the configs must be where the container sees them (regenerate the
repository there, as one refills tensorrtllm_backend's templates). The repository is
written to `<out>.partial` and renamed when complete, so a crash never leaves a
repository that looks finished.
"""

from __future__ import annotations

import shutil
import site
import sys
from pathlib import Path
from typing import Any

import kimi_trt
from kimi_trt.errors import ConfigError, UserError
from kimi_trt.output_dirs import prepare_output_dir
from kimi_trt.serving.pbtxt import Enum, string_parameters, to_pbtxt
from kimi_trt.serving.repo_spec import (
    HEADER,
    LLMAPI_MODEL,
    TORCH_MODEL,
    TORCH_SYNC_MODEL,
    TRTLLM_MODEL,
    EngineSummary,
    RepoOptions,
    io,
    summarize_engine,
)


def python_search_paths(extra: tuple[str, ...] = ()) -> list[str]:
    """sys.path entries the Triton Python stub needs: kimi_trt's parent and our site-packages."""
    paths = [str(Path(kimi_trt.__file__).resolve().parent.parent)]
    paths += site.getsitepackages() + [site.getusersitepackages()]
    paths += [p for p in sys.path if p.endswith("site-packages")]
    seen: list[str] = []
    for p in [*extra, *paths]:
        if p and Path(p).is_dir() and p not in seen:
            seen.append(p)
    return seen


def model_shim(class_name: str, paths: list[str]) -> str:
    """The `1/model.py` Triton loads: extend sys.path, then take our model class."""
    return (
        f'"""{HEADER}"""\n\n'
        "import sys\n\n"
        f"for _path in reversed({paths!r}):\n"
        "    if _path not in sys.path:\n"
        "        sys.path.insert(0, _path)\n\n"
        f"from kimi_trt.serving.triton_models import {class_name} as TritonPythonModel  # noqa: E402\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )


# The `kimi` model's interface. Names follow the tensorrt_llm model's where they mean the
# same thing, so clients (and our OpenAI server) drive both the same way.
TORCH_INPUTS = [
    io("text_input", "STRING", [1], optional=True),
    io("input_ids", "INT32", [-1], optional=True),
    io("request_output_len", "INT32", [1], optional=True),
    io("temperature", "FP32", [1], optional=True),
    io("runtime_top_p", "FP32", [1], optional=True),
    io("runtime_top_k", "INT32", [1], optional=True),
    io("seed", "UINT64", [1], optional=True),
    io("stop_token_ids", "INT32", [-1], optional=True),
    io("streaming", "BOOL", [1], optional=True),
    io("output_spec", "STRING", [1], optional=True),  # chat/constraint.OutputSpec as JSON
]
TORCH_OUTPUTS = [
    io("output_ids", "INT32", [-1]),
    io("text_output", "STRING", [1]),
    io("finish_reason", "STRING", [1]),
]


def _batch_parameter(opts: RepoOptions) -> dict[str, int]:
    """The kimi model's max_batch_size (requests generating at once), when one is chosen."""
    size = opts.triton_max_batch_size
    return {"max_batch_size": size} if size is not None else {}


def torch_model_configs(engine: EngineSummary, opts: RepoOptions) -> dict[str, dict[str, Any]]:
    """`kimi` (decoupled, runs the engine) and `kimi_sync` (one response per request, BLS)."""
    common = {
        "engine_dir": str(engine.path),
        "world_size": engine.world_size,
        "max_input_len": engine.max_input_len,
    }
    kimi = {
        "name": TORCH_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},  # kimi_sync serves whole responses
        "input": TORCH_INPUTS,
        "output": TORCH_OUTPUTS,
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": string_parameters(
            {**common, **opts.scheduling.parameters(), **_batch_parameter(opts)}
        ),
    }
    sync = {
        "name": TORCH_SYNC_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "input": [i for i in TORCH_INPUTS if i["name"] != "streaming"],
        "output": TORCH_OUTPUTS,
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": string_parameters({**common, "target_model": TORCH_MODEL}),
    }
    return {TORCH_MODEL: kimi, TORCH_SYNC_MODEL: sync}


def _python_model_classes(engine: EngineSummary) -> dict[str, str]:
    if engine.kind == "torch":
        return {TORCH_MODEL: "KimiEngineModel", TORCH_SYNC_MODEL: "KimiSyncModel"}
    if engine.kind == "llmapi":
        return {LLMAPI_MODEL: "KimiEngineModel"}
    return {"preprocessing": "KimiPreprocessModel", "postprocessing": "KimiPostprocessModel"}


def repo_configs(engine: EngineSummary, opts: RepoOptions) -> dict[str, dict[str, Any]]:
    """Every model's config (model name -> config dict) for this engine."""
    if engine.kind == "torch":
        return torch_model_configs(engine, opts)
    if engine.kind == "llmapi":
        from kimi_trt.serving.triton_llmapi import llmapi_model_config

        return {LLMAPI_MODEL: llmapi_model_config(engine, opts, TORCH_INPUTS, TORCH_OUTPUTS)}
    from kimi_trt.serving.triton_trtllm_models import trtllm_model_configs

    tokenizer = opts.tokenizer_dir or engine.tokenizer_dir
    if tokenizer is None:
        raise ConfigError(
            f"{engine.path}: no tiktoken.model in the engine dir or its tokenizer/ folder; "
            "pass --tokenizer-dir"
        )
    return trtllm_model_configs(engine, opts, Path(tokenizer).resolve())


def write_triton_repo(
    engine_dir: str | Path, out: str | Path, opts: RepoOptions | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the model repository for `engine_dir` into `out`; returns a summary."""
    opts = opts or RepoOptions()
    engine = summarize_engine(engine_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty (use --force to replace it)")
    configs = repo_configs(engine, opts)
    classes = _python_model_classes(engine)
    paths = python_search_paths(opts.python_paths)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    prepare_output_dir(out.parent, "parent directory of the repository")
    try:
        for name, config in configs.items():
            model_dir = partial / name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(to_pbtxt(config, HEADER))
            if name in classes:
                (model_dir / "1" / "model.py").write_text(model_shim(classes[name], paths))
        if engine.kind == "llmapi":
            from kimi_trt.serving.triton_llmapi import MODEL_YAML, llmapi_model_yaml

            (partial / LLMAPI_MODEL / "1" / MODEL_YAML).write_text(llmapi_model_yaml(engine))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(
            f"{e.filename or out}: cannot write the repository ({e.strerror})"
        ) from None
    return {
        "repository": str(out),
        "engine_kind": engine.kind,
        "world_size": engine.world_size,
        "models": sorted(configs),
        "serve_model": TORCH_MODEL if engine.kind == "torch" else TRTLLM_MODEL,
    }
