"""Multi-rank runtime under a real `mpirun`: sharded layouts reproduce world 1, failures end the job.

Each mpirun job runs several layouts in a row (one process-group start-up per world size):
world 2: TP2 (experts split by moe_tp), EP2, attention-DP2 (EP2), and EP2 on tiny-groups;
world 4: TP4 (= moe_tp 2 x ep 2) and attention-DP4. Compared with world 1 on the same
weights: prefill logits and every decode step's logits within 1e-5 of the logit scale,
identical greedy tokens for 32 steps (a batch of 3 prompts of different lengths, one
prompt alone, which leaves attention-DP ranks with no sequence of their own, and prompts
sharing an 80-token prefix, which reuse its cached KV blocks). The sharded jobs prefill in
chunks of 4 tokens, world 1 in one piece, so the chunked path is checked on every layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimi_trt.runtime.engine import load_engine
from tests.runtime_job import collect
from tests.runtime_support import (
    LAYOUTS,
    PROMPTS,
    STEPS,
    converted,
    mpi_env,
    mpirun,
    rel_err,
    run_runtime_job,
)

pytestmark = pytest.mark.mpi
PREFILL_CHUNK = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "runtime"


@pytest.fixture(scope="module")
def world1(tiny_ckpt, tiny_groups_ckpt, root):
    """World-1 results per checkpoint name (in this process)."""
    out = {}
    for ckpt in (tiny_ckpt, tiny_groups_ckpt):
        out[ckpt.name] = collect(load_engine(converted(ckpt, root, "w1")), PROMPTS, STEPS)
    return out


def run_job(world: int, engines: dict[str, Path], out: Path, kill=None, timeout=240, env=None):
    return run_runtime_job(
        world,
        engines,
        PROMPTS,
        STEPS,
        out,
        kill=kill,
        prefill_chunk=PREFILL_CHUNK,
        timeout=timeout,
        env=env,
    )


def assert_same_as_world1(got: dict, want: dict) -> None:
    for g, w in zip(got["score"], want["score"], strict=True):
        assert rel_err(g, w) <= 1e-5
    assert got["tokens"] == want["tokens"]
    for g, w in zip(got["decode_logits"], want["decode_logits"], strict=True):
        assert rel_err(g, w) <= 1e-5
    assert got["single_tokens"] == want["single_tokens"]
    assert rel_err(got["single_logits"], want["single_logits"]) <= 1e-5
    assert got["prefix_tokens"] == want["prefix_tokens"]
    for g, w in zip(got["prefix_logits"], want["prefix_logits"], strict=True):
        assert rel_err(g, w) <= 1e-5
    # the first prefixed prompt fills the cache; the others take its two full blocks
    assert got["prefix_cached"] == want["prefix_cached"] == [0, 64, 64]


@pytest.mark.parametrize(
    "world, layouts",
    [(2, ["tp2", "ep2", "dp2", "groups-ep2"]), (4, ["tp4", "dp4"])],
    ids=["world2", "world4"],
)
def test_layouts_reproduce_world1(world, layouts, tiny_ckpt, tiny_groups_ckpt, root, world1):
    engines = {}
    for name in layouts:
        ckpt = tiny_groups_ckpt if name.startswith("groups-") else tiny_ckpt
        engines[name] = converted(ckpt, root, name.removeprefix("groups-"))
        assert LAYOUTS[name.removeprefix("groups-")]["tp"] == world
    out = root / f"job-world{world}"
    proc = run_job(world, engines, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in layouts:
        ckpt = tiny_groups_ckpt if name.startswith("groups-") else tiny_ckpt
        got = torch.load(out / f"{name}.pt")
        assert_same_as_world1(got, world1[ckpt.name])


def test_cli_under_mpirun_matches_world1(tiny_ckpt, root, world1, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in PROMPTS))
    cmd = mpirun(2, sys.executable, "-m", "kimi_trt.cli", "run")
    cmd += ["--engine-dir", str(converted(tiny_ckpt, root, "dp2"))]
    cmd += ["--input-file", str(inputs), "--max-new-tokens", "8", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt_tokens"] for line in lines] == PROMPTS  # printed once, by rank 0
    eos = 1025  # tiny preset's eos_token_id: the CLI stops on it, the world-1 run did not
    for line, want in zip(lines, world1[tiny_ckpt.name]["tokens"], strict=True):
        want = want[:8]
        if eos in want:
            assert line["finish_reason"] == "stop" and line["tokens"] == want[: want.index(eos)]
        else:
            assert line["finish_reason"] == "length" and line["tokens"] == want


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_failed_rank_ends_job_without_hang(how, tiny_ckpt, root):
    """A rank SIGKILLed mid-run, or one that hangs mid-run (collective timeout 5 s here):
    the job exits non-zero within 30 s."""
    env = mpi_env()
    env["KIMI_TRT_COLLECTIVE_TIMEOUT"] = "5"
    start = time.monotonic()
    proc = run_job(
        2,
        {"ep2": converted(tiny_ckpt, root, "ep2")},
        root / f"job-{how}",
        kill={"rank": 1, "after_steps": 5, "how": how},
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    if how == "hang":
        assert "lost contact with another rank" in proc.stderr


def _run_cli(world: int, engine_dir: Path):
    cmd = mpirun(world, sys.executable, "-m", "kimi_trt.cli", "run")
    cmd += ["--engine-dir", str(engine_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=60)
    return proc, time.monotonic() - start


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_rank_file_reported_once(tiny_ckpt, root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted(tiny_ckpt, root, "tp2"), broken)
    with open(broken / "rank1.safetensors", "r+b") as f:
        f.truncate(4096)
    proc, seconds = _run_cli(2, broken)
    assert proc.returncode != 0 and seconds < 30
    errors = _error_lines(proc.stderr)
    assert len([e for e in errors if "rank1.safetensors" in e]) == 1, proc.stderr
    assert errors[0].startswith("error: rank 1:") and "Traceback" not in proc.stderr


def test_world_size_mismatch_reported_once(tiny_ckpt, root):
    proc, seconds = _run_cli(2, converted(tiny_ckpt, root, "w1"))
    assert proc.returncode == 2 and seconds < 30
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "built for world size 1 but this job has 2" in errors[0]
