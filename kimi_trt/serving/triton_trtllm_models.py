"""Model configs of the inflight-batching repository for TensorRT-LLM engines.

The layout and tensor names are tensorrtllm_backend's (`all_models/inflight_batcher_llm`),
so existing clients and tooling (genai-perf, the OpenAI frontends) work unchanged:

    ensemble:  text_input, max_tokens, temperature, top_k, top_p, seed, stream -> text_output
      preprocessing  (Python, KimiTokenizer)  QUERY -> INPUT_ID, REQUEST_INPUT_LEN, end/pad ids,
                                              STOP_WORDS_IDS ([EOS] besides end_id <|im_end|>)
      tensorrt_llm   (C++ backend)            input_ids ... -> output_ids, sequence_length
      postprocessing (Python, KimiTokenizer)  TOKENS_BATCH, SEQUENCE_LENGTH -> OUTPUT

The `tensorrt_llm` parameters are filled from the engine's config.json (engine path, max
batch size, beam width) and the deployment options (batching strategy, scheduler policy,
KV-cache fraction, decoupled streaming); on more than one GPU, `participant_ids` and
`gpu_device_ids` name every rank, as the leader-mode launch (one tritonserver per rank
under mpirun) expects. Upstream fills `${var}` templates; we write final values, and
leave out parameters whose backend default is right (an unfilled template is ignored by
the backend anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimi_trt.errors import UserError
from kimi_trt.serving.pbtxt import Enum, string_parameters
from kimi_trt.serving.repo_spec import (
    ENSEMBLE_MODEL,
    TRTLLM_MODEL,
    EngineSummary,
    RepoOptions,
    io,
)

GPUS_PER_NODE = 8
SCALAR = {"reshape": {"shape": []}}

TRTLLM_INPUTS = [
    io("input_ids", "INT32", [-1], allow_ragged_batch=True),
    io("input_lengths", "INT32", [1], **SCALAR),
    io("request_output_len", "INT32", [1]),
    io("end_id", "INT32", [1], optional=True, **SCALAR),
    io("pad_id", "INT32", [1], optional=True, **SCALAR),
    io("stop_words_list", "INT32", [2, -1], optional=True, allow_ragged_batch=True),
    io("bad_words_list", "INT32", [2, -1], optional=True, allow_ragged_batch=True),
    io("beam_width", "INT32", [1], optional=True, **SCALAR),
    io("temperature", "FP32", [1], optional=True, **SCALAR),
    io("runtime_top_k", "INT32", [1], optional=True, **SCALAR),
    io("runtime_top_p", "FP32", [1], optional=True, **SCALAR),
    io("len_penalty", "FP32", [1], optional=True, **SCALAR),
    io("repetition_penalty", "FP32", [1], optional=True, **SCALAR),
    io("presence_penalty", "FP32", [1], optional=True, **SCALAR),
    io("frequency_penalty", "FP32", [1], optional=True, **SCALAR),
    io("min_tokens", "INT32", [1], optional=True, **SCALAR),
    io("seed", "UINT64", [1], optional=True, **SCALAR),
    io("return_log_probs", "BOOL", [1], optional=True, **SCALAR),
    io("exclude_input_in_output", "BOOL", [1], optional=True, **SCALAR),
    io("stop", "BOOL", [1], optional=True),
    io("streaming", "BOOL", [1], optional=True),
]
TRTLLM_OUTPUTS = [
    io("output_ids", "INT32", [-1, -1]),
    io("sequence_length", "INT32", [-1]),
    io("cum_log_probs", "FP32", [-1]),
    io("output_log_probs", "FP32", [-1, -1]),
]


def _ids(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def tensorrt_llm_parameters(engine: EngineSummary, opts: RepoOptions) -> dict[str, Any]:
    """The `tensorrt_llm` model's backend parameters (names as the tensorrtllm backend reads them)."""
    params: dict[str, Any] = {
        "gpt_model_type": opts.batching_strategy,
        "gpt_model_path": str(engine.path),
        "max_beam_width": engine.max_beam_width,
        "batch_scheduler_policy": opts.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": opts.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": opts.enable_kv_cache_reuse,
        "enable_chunked_context": opts.enable_chunked_context,
        "exclude_input_in_output": True,
        "normalize_log_probs": True,
        "cancellation_check_period_ms": 100,
        "stats_check_period_ms": 100,
        "decoding_mode": "top_k_top_p" if engine.max_beam_width == 1 else "beam_search",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
    }
    if engine.world_size > 1 or opts.gpu_device_ids is not None:
        devices = opts.gpu_device_ids or tuple(r % GPUS_PER_NODE for r in range(engine.world_size))
        if len(devices) != engine.world_size:
            raise UserError(
                f"{len(devices)} gpu_device_ids for an engine of world size {engine.world_size}"
            )
        params["gpu_device_ids"] = _ids(list(devices))
        params["participant_ids"] = _ids(list(range(engine.world_size)))
        params["num_nodes"] = -(-engine.world_size // GPUS_PER_NODE)
    return params


def _batching(opts: RepoOptions, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "preferred_batch_size": [batch],
        "max_queue_delay_microseconds": opts.max_queue_delay_us,
    }
    if opts.max_queue_size > 0:
        out["default_queue_policy"] = {"max_queue_size": opts.max_queue_size}
    return out


def _cpu_instances(count: int) -> list[dict[str, Any]]:
    return [{"count": count, "kind": Enum("KIND_CPU")}]


def preprocessing_config(batch: int, opts: RepoOptions, tokenizer: Path) -> dict[str, Any]:
    return {
        "name": "preprocessing",
        "backend": "python",
        "max_batch_size": batch,
        "input": [
            io("QUERY", "STRING", [1]),
            io("REQUEST_OUTPUT_LEN", "INT32", [1]),
            io("END_ID", "INT32", [1], optional=True),
            io("PAD_ID", "INT32", [1], optional=True),
        ],
        "output": [
            io("INPUT_ID", "INT32", [-1]),
            io("REQUEST_INPUT_LEN", "INT32", [1]),
            io("REQUEST_OUTPUT_LEN", "INT32", [1]),
            io("OUT_END_ID", "INT32", [1]),
            io("OUT_PAD_ID", "INT32", [1]),
            io("STOP_WORDS_IDS", "INT32", [2, -1]),
        ],
        "instance_group": _cpu_instances(opts.instance_count),
        "parameters": string_parameters({"tokenizer_dir": tokenizer}),
    }


def postprocessing_config(batch: int, opts: RepoOptions, tokenizer: Path) -> dict[str, Any]:
    return {
        "name": "postprocessing",
        "backend": "python",
        "max_batch_size": batch,
        "input": [io("TOKENS_BATCH", "INT32", [-1, -1]), io("SEQUENCE_LENGTH", "INT32", [-1])],
        "output": [io("OUTPUT", "STRING", [-1])],
        "instance_group": _cpu_instances(opts.instance_count),
        "parameters": string_parameters({"tokenizer_dir": tokenizer, "skip_special_tokens": True}),
    }


def tensorrt_llm_config(engine: EngineSummary, opts: RepoOptions, batch: int) -> dict[str, Any]:
    return {
        "name": TRTLLM_MODEL,
        "backend": "tensorrtllm",
        "max_batch_size": batch,
        "model_transaction_policy": {"decoupled": opts.streaming},
        "dynamic_batching": _batching(opts, batch),
        "input": TRTLLM_INPUTS,
        "output": TRTLLM_OUTPUTS,
        "instance_group": _cpu_instances(1),  # the backend places work on the GPUs itself
        "parameters": string_parameters(tensorrt_llm_parameters(engine, opts)),
    }


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": k, "value": v} for k, v in inputs.items()],
        "output_map": [{"key": k, "value": v} for k, v in outputs.items()],
    }


def ensemble_config(batch: int) -> dict[str, Any]:
    pre = _step(
        "preprocessing",
        {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens"},
        {
            "INPUT_ID": "_INPUT_ID",
            "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
            "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
            "OUT_END_ID": "_END_ID",
            "OUT_PAD_ID": "_PAD_ID",
            "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
        },
    )
    llm = _step(
        TRTLLM_MODEL,
        {
            "input_ids": "_INPUT_ID",
            "input_lengths": "_REQUEST_INPUT_LEN",
            "request_output_len": "_REQUEST_OUTPUT_LEN",
            "end_id": "_END_ID",
            "pad_id": "_PAD_ID",
            "stop_words_list": "_STOP_WORDS_IDS",
            "temperature": "temperature",
            "runtime_top_k": "top_k",
            "runtime_top_p": "top_p",
            "seed": "seed",
            "streaming": "stream",
        },
        {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"},
    )
    post = _step(
        "postprocessing",
        {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
        {"OUTPUT": "text_output"},
    )
    return {
        "name": ENSEMBLE_MODEL,
        "platform": "ensemble",
        "max_batch_size": batch,
        "input": [
            io("text_input", "STRING", [1]),
            io("max_tokens", "INT32", [1]),
            io("temperature", "FP32", [1], optional=True),
            io("top_k", "INT32", [1], optional=True),
            io("top_p", "FP32", [1], optional=True),
            io("seed", "UINT64", [1], optional=True),
            io("stream", "BOOL", [1], optional=True),
        ],
        "output": [io("text_output", "STRING", [-1])],
        "ensemble_scheduling": {"step": [pre, llm, post]},
    }


def trtllm_model_configs(
    engine: EngineSummary, opts: RepoOptions, tokenizer: Path
) -> dict[str, dict[str, Any]]:
    """All four models of the inflight-batching repository."""
    batch = opts.triton_max_batch_size or engine.max_batch_size
    return {
        "preprocessing": preprocessing_config(batch, opts, tokenizer),
        TRTLLM_MODEL: tensorrt_llm_config(engine, opts, batch),
        "postprocessing": postprocessing_config(batch, opts, tokenizer),
        ENSEMBLE_MODEL: ensemble_config(batch),
    }
