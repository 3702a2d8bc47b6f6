"""Backend llmapi at run time: TensorRT-LLM's PyTorch backend (LLM API) behind the Engine interface.

An engine dir of backend llmapi (written by `kimi-trt build`, see kimi_trt.engine_dir) holds
the LLM-API options and a pointer to the Hugging Face checkpoint; this module opens it
with `tensorrt_llm.LLM` and presents what `runtime.engine.Engine` presents (generate with
on_token streaming, score, is_driver, worker_loop, shutdown, limits, tokenizer), so `kimi-trt
run`, `kimi-trt serve`, the Triton `kimi` model and `kimi-trt verify` run over it unchanged.

Multi-rank, as TensorRT-LLM's own launchers do it (`trtllm-llmapi-launch`,
tensorrt_llm/llmapi/mgmn_worker_node.py, and the Triton llmapi model's initialize): under
`mpirun -np N`, rank 0 builds the `LLM` with an `MpiCommSession` over COMM_WORLD and leads;
every other rank serves inside `mpi4py.futures.MPICommExecutor(COMM_WORLD)` until rank 0
shuts the session down. Token ids go in and out (`skip_tokenizer_init`, `detokenize=False`):
Kimi's tokenizer, chat template and tool-call parsing stay ours.

Only this module imports tensorrt_llm, lazily. Without it (or without a GPU) loading raises
MissingCapability (exit 3) with the command to run on a GPU host. Reading the dir, the LLM()
keyword arguments and the SamplingParams mapping are plain functions tested without it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_trt.engine_dir import ENGINE_CONFIG, LLMAPI_BACKEND
from kimi_trt.errors import ConfigError, MissingCapability
from kimi_trt.llmapi.options import OPTIONS_FILE, read_options
from kimi_trt.runtime.generate import GenerationResult, OnToken
from kimi_trt.runtime.launch import check_world_size, detect_rank_info
from kimi_trt.runtime.requests import check_prompts, default_stop_ids, unconstrained_batch
from kimi_trt.runtime.sampling import SamplingParams

PINNED = "tensorrt-llm==1.2.1"


@dataclass(frozen=True)
class LlmApiDir:
    """An engine dir of backend llmapi, read without tensorrt_llm."""

    path: Path
    checkpoint: Path
    options: dict[str, Any]
    world_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    vocab_size: int
    eos_token_id: int


def read_llmapi_dir(engine_dir: Path) -> LlmApiDir:
    """The dir's config.json and options file (one-line ConfigError when either is wrong)."""
    src = engine_dir / ENGINE_CONFIG
    try:
        raw = json.loads(src.read_text())
        assert raw.get("backend") == LLMAPI_BACKEND
        limits, hf = raw["build_config"], raw["hf_config"]
        return LlmApiDir(
            path=engine_dir,
            checkpoint=Path(raw["checkpoint"]),
            options=read_options(engine_dir / OPTIONS_FILE),
            world_size=int(raw["world_size"]),
            max_batch_size=int(limits["max_batch_size"]),
            max_input_len=int(limits["max_input_len"]),
            max_seq_len=int(limits["max_seq_len"]),
            vocab_size=int(hf["vocab_size"]),
            eos_token_id=int(hf.get("eos_token_id", 1)),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"{src}: not a backend-llmapi engine config ({e!r})") from None


def llm_kwargs(d: LlmApiDir) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.LLM` for this dir: the options file, the checkpoint,
    and token ids in and out (our tokenizer stays in front)."""
    return {**d.options, "model": str(d.checkpoint), "skip_tokenizer_init": True}


def sampling_kwargs(p: SamplingParams, stop_ids: tuple[int, ...]) -> dict[str, Any]:
    """`tensorrt_llm.SamplingParams` keyword arguments (tensorrt_llm/sampling_params.py) for
    ours. Greedy is top_k 1 with no temperature/top_p, as its `_greedy_decoding` reads it."""
    out: dict[str, Any] = {
        "max_tokens": p.max_new_tokens,
        "end_id": stop_ids[0] if stop_ids else -1,
        "stop_token_ids": list(stop_ids),
        "detokenize": False,
        "seed": p.seed,
    }
    if p.greedy:
        return {**out, "top_k": 1, "top_p": None, "temperature": None}
    return {**out, "top_k": p.top_k or None, "top_p": p.top_p, "temperature": p.temperature}


def finish_command(d: LlmApiDir) -> str:
    run = f"kimi-trt run --engine-dir {d.path} --chat Hello"
    return run if d.world_size == 1 else f"mpirun -np {d.world_size} {run}"


def tensorrt_llm_problem() -> str | None:
    """Why TensorRT-LLM's PyTorch backend cannot run here (None: it can)."""
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as e:
        return f"tensorrt_llm cannot be imported ({e}); install {PINNED} (pip install 'kimi_trt[trtllm]')"
    import torch

    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible"
    return None


def require_tensorrt_llm(d: LlmApiDir) -> None:
    problem = tensorrt_llm_problem()
    if problem:
        raise MissingCapability(
            f"{d.path} runs on TensorRT-LLM's PyTorch backend, which is not usable here: "
            f"{problem}. On a GPU host with {PINNED}: {finish_command(d)}"
        )


def check_with_tensorrt_llm(engine_dir: Path) -> None:
    """TensorRT-LLM's own validation of the dir's options (TorchLlmArgs), on a GPU host."""
    from tensorrt_llm.llmapi import TorchLlmArgs

    d = read_llmapi_dir(engine_dir)
    try:
        TorchLlmArgs(**{k: v for k, v in llm_kwargs(d).items() if k != "skip_tokenizer_init"})
    except Exception as e:  # pydantic's ValidationError and TensorRT-LLM's own checks
        raise ConfigError(f"{engine_dir / OPTIONS_FILE}: TorchLlmArgs refuses it: {e}") from None


def load_llmapi_engine(engine_dir: Path, tokenizer=None) -> LlmApiEngine:
    """Open the dir on this rank: rank 0 builds the LLM, the others get a worker engine."""
    d = read_llmapi_dir(engine_dir)
    require_tensorrt_llm(d)
    info = detect_rank_info()
    check_world_size(info, d.world_size, str(engine_dir))
    llm = None
    if info.rank == 0:
        from tensorrt_llm import LLM

        kwargs = llm_kwargs(d)
        if d.world_size > 1:
            from mpi4py.MPI import COMM_WORLD
            from tensorrt_llm.llmapi import MpiCommSession

            kwargs["_mpi_session"] = MpiCommSession(comm=COMM_WORLD, n_workers=d.world_size)
        llm = LLM(**kwargs)
    return LlmApiEngine(d, llm, info.rank, tokenizer)


class LlmApiEngine:
    """The Engine interface over `tensorrt_llm.LLM` (rank 0) or an MPI worker (ranks > 0)."""

    backend = LLMAPI_BACKEND
    supports_constraints = False  # per-request token constraints: the torch executor only
    precision = "bf16"

    def __init__(self, d: LlmApiDir, llm, rank: int, tokenizer):
        self._dir, self._llm = d, llm
        self.rank, self.world_size = rank, d.world_size
        self.is_driver = rank == 0
        self.max_batch_size = d.max_batch_size
        self.max_input_len = d.max_input_len
        self.max_seq_len = d.max_seq_len
        self.vocab_size = d.vocab_size
        self.tokenizer = tokenizer
        self.eos_token_ids = default_stop_ids([d.eos_token_id], tokenizer)

    def validate_prompts(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        check_prompts(prompts, params, self.vocab_size, self.max_input_len, self.max_seq_len)

    def _sampling(self, p: SamplingParams, **extra: Any):
        from tensorrt_llm import SamplingParams as TrtllmSampling

        stop = p.stop_token_ids if p.stop_token_ids is not None else self.eos_token_ids
        return TrtllmSampling(**sampling_kwargs(p, tuple(stop)), **extra)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_token: OnToken | None = None,
        constraints: list | None = None,
    ) -> list[GenerationResult]:
        """Every prompt submitted at once (TensorRT-LLM batches them in flight), streamed."""
        plist = unconstrained_batch(self, prompts, params, constraints, "the LLM API backend")
        results = [GenerationResult(prompt_tokens=list(p)) for p in prompts]

        async def one(i: int) -> None:
            p = plist[i]
            stop = set(p.stop_token_ids if p.stop_token_ids is not None else self.eos_token_ids)
            request = self._llm.generate_async(
                prompts[i], sampling_params=self._sampling(p), streaming=True
            )
            res, seen = results[i], 0
            async for out in request:
                ids = list(out.outputs[0].token_ids)
                for token in ids[seen:]:
                    if token in stop:
                        res.finish_reason = "stop"
                        return
                    res.tokens.append(token)
                    if on_token is not None and on_token(i, token) is False:
                        request.abort()
                        res.finish_reason = "cancelled"
                        return
                seen = len(ids)
            res.finish_reason = "length" if len(res.tokens) >= p.max_new_tokens else "stop"

        async def run_all() -> None:
            await asyncio.gather(*(one(i) for i in range(len(prompts))))

        asyncio.run(run_all())
        return results

    def score(self, prompts: list[list[int]]):
        """Float32 logits [len(prompt), vocab] of every prompt position (context logits)."""
        self.validate_prompts(prompts, [SamplingParams(max_new_tokens=0)] * len(prompts))
        one_token = SamplingParams(max_new_tokens=1)
        out = []
        for prompt in prompts:
            sampling = self._sampling(one_token, return_context_logits=True)
            result = self._llm.generate(prompt, sampling_params=sampling)
            out.append(result.context_logits.float().cpu())
        return out

    def worker_loop(self) -> None:
        """Ranks > 0: serve rank 0's MpiCommSession until it shuts down (mgmn_worker_node)."""
        from mpi4py.futures import MPICommExecutor
        from mpi4py.MPI import COMM_WORLD

        with MPICommExecutor(COMM_WORLD) as executor:
            if executor is not None:
                raise RuntimeError(f"rank {self.rank} got the MPI executor; rank 0 leads")

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
