"""The `llmapi` model repository for engine dirs of backend llmapi (TensorRT-LLM's PyTorch backend).

Layout as tensorrtllm_backend's `triton_backend/all_models/llmapi/` (in TensorRT-LLM's
repository since 1.0): one model `tensorrt_llm` with `config.pbtxt` (Python backend),
`1/model.py` and `1/model.yaml`. model.yaml is upstream's format - `model:` (the checkpoint),
`backend: pytorch`, every other key a TorchLlmArgs option passed to `LLM(...)`, and
`triton_config` (decoupled, max_batch_size) read by the model's auto_complete_config - and
holds exactly the options of the engine dir's llm_api_options.yaml, so upstream's own
model.py (text in, text out, its own HF tokenizer) can be dropped in beside it.

Our 1/model.py is the `kimi` Python model (serving/triton_models.py) over `load_engine`,
which opens the engine dir with TensorRT-LLM's LLM API (runtime/llmapi_backend.py): token
ids in and out, Kimi's tokenizer in front, so `kimi-trt serve --triton` parses Kimi's tool
calls from the exact tokens (upstream's text_output drops special tokens, and with them
Kimi's tool-call markers). config.pbtxt therefore declares the `kimi` interface, decoupled.
"""

from __future__ import annotations

from typing import Any

import yaml

from kimi_trt.serving.pbtxt import Enum, string_parameters
from kimi_trt.serving.repo_spec import LLMAPI_MODEL, EngineSummary, RepoOptions

MODEL_YAML = "model.yaml"


def llmapi_model_config(
    engine: EngineSummary, opts: RepoOptions, inputs: list[dict], outputs: list[dict]
) -> dict[str, Any]:
    """config.pbtxt of the `tensorrt_llm` model: the `kimi` model's `inputs`/`outputs`
    (triton_repo's, passed in) over the LLM API."""
    return {
        "name": LLMAPI_MODEL,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": inputs,
        "output": outputs,
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": string_parameters(
            {
                "engine_dir": str(engine.path),
                "world_size": engine.world_size,
                "max_input_len": engine.max_input_len,
                **opts.scheduling.parameters(),
            }
        ),
    }


def llmapi_model_yaml(engine: EngineSummary) -> str:
    """1/model.yaml in upstream's format: LLM() keyword arguments + triton_config."""
    from kimi_trt.runtime.llmapi_backend import read_llmapi_dir

    d = read_llmapi_dir(engine.path)
    body = {"model": str(d.checkpoint), **d.options}
    body["triton_config"] = {"max_batch_size": 0, "decoupled": True}
    head = (
        "# TensorRT-LLM LLM() arguments (tensorrtllm_backend llmapi layout), the engine dir's\n"
        f"# {engine.path}/llm_api_options.yaml plus the model; written by kimi-trt triton-repo.\n"
    )
    return head + yaml.safe_dump(body, sort_keys=False)
