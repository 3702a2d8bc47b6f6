"""TensorRT-LLM backend: run `rank{N}.engine` files with TensorRT-LLM's C++ Executor (leader mode).

Only imported when an engine dir holds `rank{N}.engine` files, and it imports
tensorrt_llm lazily: without CUDA or without tensorrt_llm it raises MissingCapability
(exit 3) saying what is missing. Written against TensorRT-LLM 1.2's executor bindings
(`tensorrt_llm/bindings/executor`: Executor, ExecutorConfig, KvCacheConfig, Request,
SamplingConfig, Response; see `tensorrt_llm/runtime/model_runner_cpp.py`, which wraps
the same API). Leader mode: every MPI rank constructs the Executor; only the rank for
which `can_enqueue_requests()` is true (rank 0) enqueues requests, the others keep the
engine's worker threads alive until shutdown. This path needs a GPU host and is not
exercised by the CPU test suite.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from kimi_trt.errors import ConfigError, MissingCapability
from kimi_trt.runtime.generate import GenerationResult, OnToken
from kimi_trt.runtime.launch import check_world_size, detect_rank_info
from kimi_trt.runtime.requests import check_prompts, default_stop_ids, unconstrained_batch
from kimi_trt.runtime.sampling import SamplingParams

_POLL = timedelta(milliseconds=100)


def _require_tensorrt_llm(engine_dir: Path):
    import torch

    if not torch.cuda.is_available():
        raise MissingCapability(
            f"{engine_dir} holds TensorRT-LLM engines, which need an NVIDIA GPU; none is visible"
        )
    try:
        from tensorrt_llm.bindings import executor as trtllm
    except ImportError as e:
        raise MissingCapability(
            f"{engine_dir} holds TensorRT-LLM engines but tensorrt_llm cannot be imported ({e}); "
            "install it with: pip install 'kimi_trt[trtllm]'"
        ) from None
    return trtllm


def load_trtllm_engine(engine_dir: Path, tokenizer=None) -> TrtllmEngine:
    trtllm = _require_tensorrt_llm(engine_dir)
    try:
        raw = json.loads((engine_dir / "config.json").read_text())
        pretrained = raw["pretrained_config"]
        world = int(pretrained["mapping"]["world_size"])
        build = raw.get("build_config", {})
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConfigError(
            f"{engine_dir}/config.json: not a TensorRT-LLM engine config ({e})"
        ) from None
    info = detect_rank_info()
    check_world_size(info, world, str(engine_dir))
    config = trtllm.ExecutorConfig(
        max_beam_width=1,
        kv_cache_config=trtllm.KvCacheConfig(
            free_gpu_memory_fraction=float(build.get("kv_cache_free_gpu_mem_fraction", 0.9))
        ),
    )
    executor = trtllm.Executor(engine_dir, trtllm.ModelType.DECODER_ONLY, config)
    return TrtllmEngine(trtllm, executor, info.rank, world, build, pretrained, tokenizer)


class TrtllmEngine:
    """The `Engine` interface (generate / worker_loop / shutdown) over a TensorRT-LLM Executor."""

    backend = "trtllm"
    precision = "bf16"
    supports_constraints = False  # per-request token constraints: the torch executor only

    def __init__(self, trtllm, executor, rank, world, build, pretrained, tokenizer):
        self._trtllm = trtllm
        self._executor = executor
        self.rank = rank
        self.world_size = world
        self.is_driver = executor.can_enqueue_requests()
        self.max_batch_size = int(build.get("max_batch_size", 1))
        self.max_input_len = int(build.get("max_input_len", 1))
        self.max_seq_len = int(build.get("max_seq_len", 2))
        self.vocab_size = int(pretrained["vocab_size"])
        self.tokenizer = tokenizer
        self.eos_token_ids = default_stop_ids([int(pretrained.get("eos_token_id", 1))], tokenizer)

    def validate_prompts(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        check_prompts(prompts, params, self.vocab_size, self.max_input_len, self.max_seq_len)

    def _request(self, prompt: list[int], p: SamplingParams):
        t = self._trtllm
        stop = list(p.stop_token_ids if p.stop_token_ids is not None else self.eos_token_ids)
        sampling = t.SamplingConfig(
            beam_width=1,
            top_k=1 if p.greedy else (p.top_k or None),
            top_p=None if p.greedy else p.top_p,
            temperature=None if p.greedy else p.temperature,
            seed=p.seed,
        )
        return t.Request(
            input_token_ids=prompt,
            max_tokens=p.max_new_tokens,
            streaming=True,
            sampling_config=sampling,
            end_id=stop[0] if stop else -1,
            pad_id=stop[0] if stop else 0,
            stop_words=[[s] for s in stop[1:]] or None,
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_token: OnToken | None = None,
        constraints: list | None = None,
    ) -> list[GenerationResult]:
        plist = unconstrained_batch(self, prompts, params, constraints, "TensorRT-LLM engines")
        ids = self._executor.enqueue_requests(
            [self._request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        )
        index = {rid: i for i, rid in enumerate(ids)}
        results = [GenerationResult(prompt_tokens=list(p)) for p in prompts]
        pending = set(ids)
        while pending:
            for resp in self._executor.await_responses(timeout=_POLL):
                if resp.request_id not in pending:  # late responses of a cancelled request
                    continue
                i = index[resp.request_id]
                if resp.has_error():
                    raise RuntimeError(f"TensorRT-LLM request {i} failed: {resp.error_msg}")
                self._accept(resp, i, results[i], plist[i], on_token, pending)
        return results

    def _accept(self, resp, i, res, p, on_token, pending) -> None:
        out = resp.result
        stop = set(p.stop_token_ids if p.stop_token_ids is not None else self.eos_token_ids)
        for token in out.output_token_ids[0]:
            if token in stop:
                res.finish_reason = "stop"
                break
            res.tokens.append(token)
            if on_token is not None and on_token(i, token) is False:
                self._executor.cancel_request(resp.request_id)
                res.finish_reason = "cancelled"
                break
        if out.is_final or res.finish_reason is not None:
            res.finish_reason = res.finish_reason or "length"
            pending.discard(resp.request_id)

    def worker_loop(self) -> None:
        """Non-leader ranks: block in the executor's collective shutdown until rank 0's."""
        self._executor.shutdown()

    def shutdown(self) -> None:
        self._executor.shutdown()
