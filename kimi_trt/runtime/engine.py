"""`load_engine(dir) -> Engine`: the runtime's public entry point (CLI, serving, build checks).

The backend is chosen by what the directory holds: config.json of backend llmapi ->
TensorRT-LLM's PyTorch backend (llmapi_backend.py); `rank{N}.engine` files -> TensorRT-LLM
engines (trtllm_backend.py); both GPU hosts with tensorrt_llm only; a per-rank checkpoint (config.json
with a `kimi_trt` object, in the dir or its `checkpoint/` subdir) -> the torch executor.

Multi-rank protocol: every rank calls `load_engine`. Rank 0 then drives - `generate`
(or `submit` + `step`, the continuous-batching API a server uses), `score`, finally
`shutdown` - and the other ranks call `worker_loop()`, which executes the commands rank 0
broadcasts (allocate the KV block pool, run a step, ping) until shutdown. Requests
are validated on rank 0 before anything is broadcast, so a bad request raises a UserError
there and leaves the workers waiting for the next command. Rank 0's commands go through a
ControlChannel (control.py): a heartbeat while idle, and after a peer fails every command
fails at once (`Engine.failure`, `Engine.on_failure`) instead of waiting on a broken job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_trt.convert.rank_checkpoint import is_rank_checkpoint, read_rank_config
from kimi_trt.engine_dir import is_llmapi_dir
from kimi_trt.errors import ConfigError, UserError
from kimi_trt.json_files import read_json_or
from kimi_trt.runtime.comm import Comm
from kimi_trt.runtime.control import ControlChannel
from kimi_trt.runtime.executor import StepPlan, TorchExecutor
from kimi_trt.runtime.failure import shared
from kimi_trt.runtime.generate import (
    GenerationLoop,
    GenerationRequest,
    GenerationResult,
    LoopStats,
    OnToken,
)
from kimi_trt.runtime.kv_blocks import BlockPool
from kimi_trt.runtime.launch import (
    HEARTBEAT_S,
    RankInfo,
    bind_device,
    check_world_size,
    detect_rank_info,
    init_process_groups,
)
from kimi_trt.runtime.requests import check_prompts, default_stop_ids, sampling_params_list
from kimi_trt.runtime.sampling import SamplingParams, TokenConstraint
from kimi_trt.runtime.scheduling import KV_BLOCK_SIZE, Scheduling

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ_LEN = 4096


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int


@dataclass
class _Runtime:
    info: RankInfo
    device: torch.device
    comm: Comm


_RUNTIME: _Runtime | None = None


def init_runtime() -> _Runtime:
    """This process's rank, device and process groups (created once per process)."""
    global _RUNTIME
    if _RUNTIME is None:
        info = detect_rank_info()
        device = bind_device(info)
        groups = init_process_groups(info, device)
        _RUNTIME = _Runtime(info, device, Comm(info, groups, device))
    return _RUNTIME


def find_checkpoint_dir(engine_dir: Path) -> Path | None:
    """The per-rank checkpoint inside an engine dir: the dir itself or `checkpoint/`."""
    for d in (engine_dir, engine_dir / "checkpoint"):
        if is_rank_checkpoint(d):
            return d
    return None


def read_limits(engine_dir: Path, model_max_positions: int) -> Limits:
    """Limits from config.json `build_config` (written by `kimi-trt build`), else defaults."""
    cfg = read_json_or(engine_dir / "config.json", {})
    raw = cfg.get("build_config") if isinstance(cfg, dict) else None
    raw = raw if isinstance(raw, dict) else {}
    max_seq = int(raw.get("max_seq_len") or min(model_max_positions, DEFAULT_MAX_SEQ_LEN))
    return Limits(
        max_batch_size=int(raw.get("max_batch_size") or DEFAULT_MAX_BATCH),
        max_input_len=int(raw.get("max_input_len") or max_seq - 1),
        max_seq_len=max_seq,
    )


def override_limits(limits: Limits, max_batch_size: int | None, max_seq_len: int | None) -> Limits:
    """The caller's limits where given (max_input_len stays below max_seq_len)."""
    batch = max_batch_size or limits.max_batch_size
    seq = max_seq_len or limits.max_seq_len
    if batch < 1 or seq < 2:
        raise ConfigError(f"max_batch_size ({batch}) must be >= 1 and max_seq_len ({seq}) >= 2")
    return Limits(batch, min(limits.max_input_len, seq - 1), seq)


def load_tokenizer(engine_dir: Path, tokenizer_dir: Path | None = None):
    """`tokenizer_dir`'s KimiTokenizer, else the engine dir's (or its tokenizer/), else None."""
    from kimi_trt.chat.tokenizer import KimiTokenizer

    if tokenizer_dir is not None:
        return KimiTokenizer.from_dir(tokenizer_dir)
    for d in (engine_dir, engine_dir / "tokenizer"):
        if (d / "tiktoken.model").is_file():
            return KimiTokenizer.from_dir(d)
    return None


def load_engine(
    engine_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    progress: bool = False,
    verify_checksums: bool = True,
    scheduling: Scheduling | None = None,
):
    """Open an engine dir on this rank (every rank of the job calls this).

    dtype: compute dtype (default float32 on CPU, bfloat16 on GPU). max_batch_size /
    max_seq_len override the engine dir's limits (requests generating at once, and the
    longest sequence). verify_checksums: check each rank file against its manifest digest
    while loading (`runtime/integrity`); off only for a caller that has just re-hashed
    every file. scheduling: prefill chunk and prefix cache of the torch executor's loop.
    """
    path = Path(engine_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: engine dir not found")
    if is_llmapi_dir(path):
        from kimi_trt.runtime.llmapi_backend import load_llmapi_engine

        tokenizer = load_tokenizer(path, Path(tokenizer_dir) if tokenizer_dir else None)
        return load_llmapi_engine(path, tokenizer)
    if any(path.glob("rank*.engine")):
        from kimi_trt.runtime.trtllm_backend import load_trtllm_engine

        tokenizer = load_tokenizer(path, Path(tokenizer_dir) if tokenizer_dir else None)
        return load_trtllm_engine(path, tokenizer)
    ckpt = find_checkpoint_dir(path)
    if ckpt is None:
        raise ConfigError(
            f"{path}: neither rank{{N}}.engine files nor a per-rank checkpoint "
            "(config.json with a 'kimi_trt' object; made by `kimi-trt convert` or `kimi-trt build`)"
        )
    rt = init_runtime()
    try:
        cfg = read_rank_config(ckpt)
        check_world_size(rt.info, cfg.world_size, str(path))
        limits = read_limits(path, cfg.model.max_position_embeddings)
        limits = override_limits(limits, max_batch_size, max_seq_len)
        tokenizer = load_tokenizer(path, Path(tokenizer_dir) if tokenizer_dir else None)
    except UserError as e:  # identical on every rank: reported once, by rank 0
        raise shared(e) from None
    if dtype is None:
        dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    executor = TorchExecutor(
        cfg, rt.comm, dtype, limits.max_seq_len, progress=progress, verify_checksum=verify_checksums
    )
    rt.comm.barrier()  # ranks load at different speeds; wait without the collective timeout
    return Engine(rt, executor, limits, tokenizer, scheduling or Scheduling())


class Engine:
    """A loaded model on this rank. Rank 0: generate/score/shutdown; others: worker_loop."""

    def __init__(
        self,
        rt: _Runtime,
        executor: TorchExecutor,
        limits: Limits,
        tokenizer,
        scheduling: Scheduling,
    ):
        self._rt = rt
        self._executor = executor
        self.limits = limits
        self.tokenizer = tokenizer
        self.scheduling = scheduling
        self.model_config = executor.model
        self.backend = "torch"
        self.supports_constraints = True  # generate(constraints=...) applies them at sampling
        self._channel = (
            ControlChannel(rt.comm, self._execute, HEARTBEAT_S) if self.is_driver else None
        )
        self._loop: GenerationLoop | None = None

    @property
    def failure(self) -> BaseException | None:
        """Rank 0: the error that broke the multi-rank job (None while it is healthy)."""
        return self._channel.failure if self._channel is not None else None

    @property
    def on_failure(self):
        return self._channel.on_failure if self._channel is not None else None

    @on_failure.setter
    def on_failure(self, callback) -> None:
        """Rank 0: called once, from the thread that saw it, when the job breaks."""
        self._require_driver("on_failure")
        self._channel.on_failure = callback

    # ---- properties the serving / build code relies on -------------------------------
    @property
    def rank(self) -> int:
        return self._rt.info.rank

    @property
    def world_size(self) -> int:
        return self._rt.info.world_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def max_input_len(self) -> int:
        return self.limits.max_input_len

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def precision(self) -> str:
        """'fp32' or 'bf16': the compute precision (kimi-trt verify's tolerances follow it)."""
        return "fp32" if self._executor.dtype == torch.float32 else "bf16"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Default stop ids: config eos, plus the tokenizer's (<|im_end|>) when present."""
        return default_stop_ids(self.model_config.eos_token_ids, self.tokenizer)

    # ---- driver API (rank 0) ---------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_token: OnToken | None = None,
        constraints: list[TokenConstraint | None] | None = None,
    ) -> list[GenerationResult]:
        """Continue each prompt. `on_token(i, token)` streams; returning False cancels request i.
        `constraints[i]` (optional) restricts request i's tokens (sampling.TokenConstraint).
        Runs the loop until these requests end (requests submitted by others run along)."""
        self._require_driver("generate")
        plist = sampling_params_list(prompts, params)
        self.validate_prompts(prompts, plist)
        constraints = constraints or [None] * len(prompts)

        def stream(i: int):
            return None if on_token is None else (lambda token: on_token(i, token))

        results = [
            self.loop.submit(GenerationRequest(list(p), sp, stream(i), None, constraints[i]))
            for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))
        ]
        while any(r.finish_reason is None for r in results):
            self.loop.step()
        return results

    def submit(self, request: GenerationRequest) -> None:
        """Validate one request (UserError) and queue it; it joins the loop at the next
        `step()`. For a server driving the loop from one thread."""
        self._require_driver("submit")
        self.validate_prompts([request.prompt], [request.params])
        self.loop.submit(request)

    def step(self) -> bool:
        """One scheduling step of the loop (False: nothing was waiting or running)."""
        return self.loop.step()

    def stats(self) -> LoopStats:
        return self.loop.stats()

    @property
    def loop(self) -> GenerationLoop:
        """Rank 0's generation loop (made, with every rank's KV block pool, on first use)."""
        if self._loop is None:
            n_slots = self.max_batch_size
            per_seq = -(-self.max_seq_len // KV_BLOCK_SIZE)
            seats: dict[int | None, int] = {}
            for s in range(n_slots):
                seats[self._executor.owner(s)] = seats.get(self._executor.owner(s), 0) + 1
            pools = {
                owner: BlockPool(n * per_seq, KV_BLOCK_SIZE, self.scheduling.prefix_cache)
                for owner, n in seats.items()
            }
            self._command(("cache", max(p.n_blocks for p in pools.values()), KV_BLOCK_SIZE))
            self._loop = GenerationLoop(
                self._step,
                self._executor.owner,
                n_slots,
                pools,
                self.eos_token_ids,
                self.max_seq_len,
                self.scheduling.prefill_chunk,
            )
        return self._loop

    def score(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Float32 logits [len(prompt), vocab] for every position of each prompt (one prefill)."""
        self._require_driver("score")
        self.validate_prompts(prompts, [SamplingParams(max_new_tokens=0)] * len(prompts))
        out: list[torch.Tensor] = []
        pools = self.loop.pools
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[start : start + self.max_batch_size]
            slots = list(range(len(chunk)))
            owners = [pools[self._executor.owner(s)] for s in slots]
            tables = [
                pool.allocate(pool.blocks_for(len(p)))
                for pool, p in zip(owners, chunk, strict=True)
            ]
            try:
                plan = StepPlan(slots, chunk, [0] * len(chunk), tables, [False] * len(chunk), True)
                logits = self._step(plan)
            finally:
                for pool, table in zip(owners, tables, strict=True):
                    pool.release(table)
            offsets = [0]
            for p in chunk:
                offsets.append(offsets[-1] + len(p))
            out += [logits[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
        return out

    def shutdown(self) -> None:
        """Release the workers from worker_loop (rank 0; a no-op on one rank or a failed job)."""
        if self._channel is not None:
            self._channel.close(("shutdown",))
        self._executor.release_cache()

    # ---- worker API (ranks > 0) ------------------------------------------------------
    def worker_loop(self) -> None:
        """Follow rank 0's commands until it calls shutdown()."""
        if self.is_driver:
            raise RuntimeError("worker_loop() is for ranks > 0; rank 0 calls generate()")
        while True:
            cmd = self._rt.comm.broadcast_object(None)
            if cmd[0] == "shutdown":
                self._executor.release_cache()
                return
            self._execute(cmd)

    # ---- internals -------------------------------------------------------------------
    def _execute(self, cmd: tuple):
        if cmd[0] == "cache":
            return self._executor.ensure_cache(cmd[1], cmd[2])
        if cmd[0] == "step":
            return self._executor.step(cmd[1])
        if cmd[0] == "ping":
            return self._rt.comm.ping()
        raise RuntimeError(f"unknown runtime command {cmd[0]!r}")

    def _command(self, cmd: tuple):
        """Broadcast a command from rank 0 and run it here too."""
        return self._channel.send(cmd)

    def _step(self, plan: StepPlan) -> torch.Tensor:
        return self._command(("step", plan)).cpu()

    def _require_driver(self, what: str) -> None:
        if not self.is_driver:
            raise RuntimeError(f"{what}() runs on rank 0; rank {self.rank} calls worker_loop()")

    def validate_prompts(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Raise UserError (before anything is broadcast) for prompts the engine cannot run."""
        check_prompts(prompts, params, self.vocab_size, self.max_input_len, self.max_seq_len)
