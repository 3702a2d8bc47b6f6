"""Helpers shared by the runtime tests: layouts, conversions (cached per session), tolerances."""

from __future__ import annotations

import socket
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
