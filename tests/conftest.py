"""Shared fixtures: synthetic checkpoints (session-scoped, written once per run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the Triton interpreter, which must be chosen before
# anything imports triton (transformers' DeepseekV3 does), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
K2_CONFIG = REPO / "kimi_trt" / "assets" / "kimi-k2-instruct.config.json"
VENV_BIN = Path(sys.executable).parent


def cli_env() -> dict[str, str]:
    """Environment for subprocesses: the venv's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m kimi_trt.cli ARGS` as a user runs it (venv first on PATH), output captured
    as text. One definition for the tests that drive the real CLI in a subprocess; each file
    picks its own timeout."""
    return subprocess.run(
        [sys.executable, "-m", "kimi_trt.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    write_synthetic_checkpoint(preset_config("tiny"), out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_groups_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_groups")
    write_synthetic_checkpoint(preset_config("tiny-groups"), out, seed=1, progress=False)
    return out
