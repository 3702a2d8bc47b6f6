"""Helpers shared by the runtime tests: layouts, conversions (cached per session), tolerances."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from kimi_trt.config import Parallelism, WeightFormats
from kimi_trt.convert.converter import run_conversion
from tests.conftest import VENV_BIN, cli_env

# name -> Parallelism fields (TensorRT-LLM Mapping: tp = ep x moe_tp).
LAYOUTS: dict[str, dict] = {
    "w1": {"tp": 1},
    "tp2": {"tp": 2, "ep": 1, "moe_tp": 2},
    "ep2": {"tp": 2, "ep": 2, "moe_tp": 1},
    "dp2": {"tp": 2, "ep": 2, "moe_tp": 1, "attention_dp": True},
    "tp4": {"tp": 4, "ep": 2, "moe_tp": 2},
    "dp4": {"tp": 4, "ep": 2, "moe_tp": 2, "attention_dp": True},
}
# Prompts of different lengths (a batch exercises packing and per-slot cache lengths).
PROMPTS = [[5, 17, 300, 42, 99, 7, 8], [11, 12, 13], [900, 1, 64, 2, 250, 3, 77, 4, 123, 5, 6]]
STEPS = 32


def converted(ckpt: Path, root: Path, layout: str, attention: str = "fp8_block") -> Path:
    """`ckpt` converted into `root/<ckpt name>-<layout>-<attention>` (once per session)."""
    out = root / f"{ckpt.name}-{layout}-{attention}"
    if not (out / "manifest.json").is_file():
        run_conversion(
            ckpt,
            out,
            Parallelism(**LAYOUTS[layout]),
            WeightFormats(attention=attention),
            progress=False,
            warn=lambda *_: None,
        )
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the logit scale max |want|."""
    return float((got - want).abs().max() / want.abs().max())


def mpi_env() -> dict[str, str]:
    env = cli_env()
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        KIMI_TRT_COLLECTIVE_TIMEOUT="20",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpirun(n: int, *args: str) -> list[str]:
    """The command line of an n-rank job with the venv's Open MPI (more ranks than cores ok)."""
    return [str(VENV_BIN / "mpirun"), "-np", str(n), "--oversubscribe", *args]


def run_runtime_job(
    world: int,
    engines: dict[str, Path],
    prompts: list[list[int]],
    steps: int,
    out: Path,
    *,
    kill: dict | None = None,
    prefill_chunk: int | None = None,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """tests/runtime_job.py on `world` ranks under mpirun (one launch for all `engines`, each
    a per-rank checkpoint of that world size), with the spec its docstring describes."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "engines": {k: str(v) for k, v in engines.items()},
                "prompts": prompts,
                "steps": steps,
                "out": str(out),
                "kill": kill,
                "prefill_chunk": prefill_chunk,
            }
        )
    )
    job = Path(__file__).resolve().parent / "runtime_job.py"
    cmd = mpirun(world, sys.executable, str(job), str(spec))
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env or mpi_env(),
        timeout=timeout,
        cwd=job.parents[1],
    )


def mpi_collect(
    world: int,
    engines: dict[str, Path],
    prompts: list[list[int]],
    steps: int,
    out: Path,
    timeout: int = 300,
) -> dict[str, dict]:
    """Rank 0's `collect` result per engine of a `run_runtime_job` that must succeed."""
    proc = run_runtime_job(world, engines, prompts, steps, out, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt") for name in engines}


def hf_logits(ref, ids: list[int]) -> torch.Tensor:
    """transformers' logits for every position of one sequence (float32)."""
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


# Decode with a bf16 fused_q_proj (absorbed MLA stored in bf16) is not transformers' math to
# 1e-4: its rounding moves logits by ~0.1-1% of their scale, more where it flips a near-tie
# in expert routing. Greedy tokens are compared only where the margin exceeds this.
BF16_MLA_TIE = 0.1


def assert_like_transformers(
    ref, got: dict, prompts: list[list[int]], mla_exact: bool, tol: float = 1e-4
) -> None:
    """The torch executor's `collect` result against transformers `ref` on the same weights:
    prefill logits (and the first generated step, which comes from prefill) within `tol` of
    the logit scale; with an exact fused_q_proj every decode step too; greedy tokens equal
    transformers' argmax on the same prefix wherever its top-2 margin is not a near-tie."""
    for prompt, logits in zip(prompts, got["score"], strict=True):
        assert rel_err(logits, hf_logits(ref, prompt)) <= tol
    tie = 2 * tol if mla_exact else BF16_MLA_TIE
    for prompt, tokens, dec in zip(prompts, got["tokens"], got["decode_logits"], strict=True):
        want = hf_logits(ref, prompt + tokens)[len(prompt) - 1 : -1]
        scale = want.abs().max()
        err = (dec - want).abs().amax(-1) / scale
        assert err[0] <= tol
        if mla_exact:
            assert err.max() <= tol
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) / scale > tie
        assert torch.equal(torch.tensor(tokens)[clear], want.argmax(-1)[clear])
