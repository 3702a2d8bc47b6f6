"""`kimi-trt verify`: its shipped references are transformers' (regenerated and compared
here so they cannot go stale); it passes on the tiny model's torch engine dirs (one rank, TP2
and EP2 under a real mpirun) and fails - exit 1, the table naming the file and the prompts -
on a dir whose rank file was altered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from kimi_trt.testing.verify_reference import TINY, build_references
from kimi_trt.verify import REFERENCES, load_references
from tests.conftest import VENV_BIN
from tests.runtime_support import mpi_env
from tests.test_build import write_config

KIMI = str(VENV_BIN / "kimi-trt")


def test_shipped_references_are_what_transformers_computes():
    cases, meta = load_references()
    tensors, fresh = build_references(TINY, meta["steps"])
    assert fresh == meta
    for i, case in enumerate(cases):
        assert tensors[f"{i}.prompt"].tolist() == case.prompt
        assert tensors[f"{i}.tokens"].tolist() == case.tokens
        assert torch.allclose(tensors[f"{i}.logits"], case.logits, rtol=0, atol=1e-5)
    assert REFERENCES.with_suffix(".safetensors").stat().st_size < 1 << 20  # compact


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny model built with the shipped tiny configs, plus a one-rank build."""
    from kimi_trt.build import run_build

    out = {}
    for name, base, changes in (
        ("w1", "tiny_cpu_tp2", {"parallelism": {"tp": 1, "ep": 1, "moe_tp": 1}}),
        ("tp2", "tiny_cpu_tp2", {}),
        ("ep2", "tiny_cpu_ep2", {}),
    ):
        tmp = tmp_path_factory.mktemp(f"verify_{name}")
        run_build(write_config(tmp, base, TINY, **changes), log=lambda s: None)
        out[name] = tmp / "engine"
    return out


def verify(engine: Path, ranks: int) -> subprocess.CompletedProcess:
    cmd = [KIMI, "verify", "--engine-dir", str(engine)]
    if ranks > 1:
        cmd = [str(VENV_BIN / "mpirun"), "--oversubscribe", "-np", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=600)


@pytest.mark.mpi
@pytest.mark.parametrize("name, ranks", [("w1", 1), ("tp2", 2), ("ep2", 2)])
def test_verify_passes_on_the_tiny_models_torch_dirs(tiny_dirs, name, ranks):
    r = verify(tiny_dirs[name], ranks)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 7/7 checks passed" in r.stdout and f"{ranks} rank(s), fp32" in r.stdout
    assert r.stdout.count(" PASS  ") == 7 and " FAIL " not in r.stdout


@pytest.mark.mpi
def test_verify_fails_on_an_altered_rank_file(tiny_dirs, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_dirs["tp2"], engine)
    rank1 = engine / "rank1.safetensors"
    data = bytearray(rank1.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    for off in range(header, len(data), 97):  # scramble weights, keep the header and size
        data[off] ^= 0x5A
    rank1.unlink()  # a hard link to the build's checkpoint: replace, do not write through
    rank1.write_bytes(bytes(data))
    r = verify(engine, 2)
    assert r.returncode != 0, r.stdout
    rows = {line[:24].strip(): line[25:] for line in r.stdout.splitlines()}
    assert rows["file rank1.safetensors"].startswith("FAIL  xxh3_128 differs from manifest.json")
    assert "error: verify failed: file rank1.safetensors" in r.stderr
    assert r.stdout.count(" FAIL ") >= 2  # the file, and the logits it now computes
