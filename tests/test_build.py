"""`kimi-trt build` on CPU: end to end through the real CLI, resume/skip, bad input.

The tiny build configs shipped in build_configs/ are used as written, with only their
checkpoint/output paths pointed at this test's synthetic checkpoint and tmp dir.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import xxhash
import yaml

from kimi_trt.build import run_build
from kimi_trt.convert.rank_checkpoint import read_rank_config
from tests.conftest import K2_CONFIG, REPO, cli_env, run_cli

CONFIGS = REPO / "build_configs"


def write_config(tmp: Path, base: str, ckpt: Path, **changes) -> Path:
    """A copy of build_configs/<base>.yaml pointing at `ckpt` and `tmp/engine`."""
    raw = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())
    for key in ("tokenizer_dir", "convert_dir"):
        if key in raw:
            raw[key] = str((CONFIGS / raw[key]).resolve())
    raw.update(checkpoint=str(ckpt), output_dir=str(tmp / "engine"))
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    path = tmp / f"{base}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


kimi = partial(run_cli, timeout=120)  # kimi(*args, timeout=...) -> CompletedProcess


def quiet_build(config: Path, stop_after: str | None = None):
    lines: list[str] = []
    return run_build(config, stop_after, log=lines.append), lines


@pytest.fixture(scope="module")
def built_ep2(tiny_ckpt, tmp_path_factory) -> Path:
    """The shipped tiny EP2 config built through the CLI (tokenizer: the small vocab)."""
    tmp = tmp_path_factory.mktemp("build_ep2")
    cfg = write_config(tmp, "tiny_cpu_ep2", tiny_ckpt)
    r = kimi("build", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    for stage in ("plan", "convert", "compile", "package"):
        assert f"[{stage}] done in" in r.stderr
    return tmp / "engine"


def test_build_cli_end_to_end(built_ep2):
    eng = built_ep2
    cfg = read_rank_config(eng)
    assert (cfg.mapping.tp_size, cfg.mapping.moe_ep_size, cfg.world_size) == (2, 2, 2)
    limits = json.loads((eng / "config.json").read_text())["build_config"]
    assert (limits["max_batch_size"], limits["max_seq_len"]) == (8, 2048)  # as the YAML says
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["kind"] == "kimi_trt.engine_dir" and manifest["backend"] == "torch"
    assert set(manifest["tokenizer_files"]) == {"tiktoken.model", "tokenizer_config.json"}
    expected = {
        "config.json",
        "rank0.safetensors",
        "rank1.safetensors",
        *manifest["tokenizer_files"],
    }
    assert set(manifest["files"]) == expected
    assert manifest["checksum_algorithm"] == "xxh3_128"
    for name, info in manifest["files"].items():
        assert xxhash.xxh3_128((eng / name).read_bytes()).hexdigest() == info["xxh3_128"], name
    # The engine dir's rank files are the converter's, byte for byte (hard links).
    conv = json.loads((eng / "checkpoint" / "manifest.json").read_text())
    for r in (0, 1):
        assert (
            manifest["files"][f"rank{r}.safetensors"]["xxh3_128"]
            == conv["files"][f"rank{r}.safetensors"]["xxh3_128"]
        )


def test_inspect_engine_dir(built_ep2):
    r = kimi("inspect", str(built_ep2), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "engine_dir"
    assert info["backend"] == "torch" and info["world_size"] == 2


def test_mpirun_run_matches_transformers(built_ep2, tiny_ckpt):
    """mpirun -np 2 kimi-trt run on the build output == transformers' greedy tokens."""
    import torch

    from kimi_trt.testing.hf_reference import load_reference_model

    prompt = [5, 17, 300, 42, 7, 99]
    steps = 8
    model = load_reference_model(tiny_ckpt)
    with torch.no_grad():
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    cmd = [
        str(Path(sys.executable).parent / "mpirun"),
        "-np", "2", "--oversubscribe",
        sys.executable, "-m", "kimi_trt.cli", "run", "--engine-dir", str(built_ep2),
        "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(steps), "--json",
    ]  # fmt: skip
    env = {**cli_env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"][:steps] == ids


def test_resume_skips_and_config_change_redoes(tiny_ckpt, tmp_path):
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt)
    first, _ = quiet_build(cfg)
    assert first.ran == ["plan", "convert", "compile", "package"]
    eng = tmp_path / "engine"
    mtimes = {p: p.stat().st_mtime_ns for p in eng.rglob("*") if p.is_file()}

    again, _ = quiet_build(cfg)
    assert again.ran == []  # second run does no work ...
    assert {p: p.stat().st_mtime_ns for p in eng.rglob("*") if p.is_file()} == mtimes  # ... at all

    # Limits change the engine, not the conversion.
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt, limits={"max_batch_size": 2})
    limits, _ = quiet_build(cfg)
    assert limits.ran == ["plan", "compile", "package"]
    assert json.loads((eng / "manifest.json").read_text())["limits"]["max_batch_size"] == 2

    # A different layout reconverts; the old conversion's files are replaced, not mixed.
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt, parallelism={"ep": 2, "moe_tp": 1})
    relayout, _ = quiet_build(cfg)
    assert relayout.ran == ["plan", "convert", "compile", "package"]
    assert read_rank_config(eng).mapping.moe_ep_size == 2

    # A damaged output is detected by its checksum and rebuilt.
    rank1 = eng / "checkpoint" / "rank1.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF
    rank1.write_bytes(bytes(data))
    repaired, lines = quiet_build(cfg)
    assert repaired.ran == ["convert"] or repaired.ran[0] == "convert"
    assert any("rank1.safetensors changed" in line for line in lines)


def test_stop_after_convert_then_finish(tiny_ckpt, tmp_path):
    cfg = write_config(tmp_path, "tiny_cpu_ep2", tiny_ckpt)
    part, _ = quiet_build(cfg, "convert")
    assert part.ran == ["plan", "convert"]
    assert not (tmp_path / "engine" / "manifest.json").exists()
    rest, _ = quiet_build(cfg)
    assert rest.ran == ["compile", "package"]


# ---- bad input --------------------------------------------------------------------------


def assert_refused(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in err, err
    return err


def test_missing_checkpoint(tmp_path):
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tmp_path / "nowhere")
    err = assert_refused(kimi("build", "--config", str(cfg)), 2, "nowhere", "does not exist")
    assert err.startswith("error: ")
    assert not (tmp_path / "engine").exists()


def test_unsupported_format_for_trtllm_refused_before_conversion(tiny_ckpt, tmp_path):
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt, backend="trtllm", gpu="h200")
    assert_refused(kimi("build", "--config", str(cfg)), 2, "weights.experts: fp8_block", "int8_wo")
    assert not (tmp_path / "engine").exists()


def test_ue8m0_on_hopper_refused(tiny_ckpt, tmp_path):
    cfg = write_config(
        tmp_path, "tiny_cpu_tp2", tiny_ckpt, gpu="h200", weights={"experts": "fp8_ue8m0"}
    )
    assert_refused(kimi("build", "--config", str(cfg)), 2, "fp8_ue8m0", "Blackwell")


def test_plan_that_does_not_fit_is_refused_with_numbers(tmp_path):
    """Kimi-K2 EP8 on H100: refused by the plan stage; no weight is read (there are none)."""
    ckpt = tmp_path / "k2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(K2_CONFIG.read_text())
    (ckpt / "model-00001-of-00001.safetensors").write_bytes(b"not read")
    cfg = write_config(
        tmp_path,
        "h200_ep8",
        ckpt,
        gpu="h100",
    )
    err = assert_refused(kimi("build", "--config", str(cfg)), 2, "does not fit", "GB", "H100")
    assert "EP16" in err  # the planner's suggestion
    assert not (tmp_path / "engine").exists()


def test_trtllm_without_gpu_stops_at_compile_with_the_finishing_command(tiny_ckpt, tmp_path):
    pytest.importorskip("torch")
    from kimi_trt.trtllm.compile import missing_capability

    if missing_capability() is None:
        pytest.skip("this host can build engines")
    fmts = {"attention": "bf16", "dense_mlp": "bf16", "experts": "int8_wo"}
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt, backend="trtllm", gpu="h200",
                       kv_cache_dtype="bf16", weights=fmts)  # fmt: skip
    r = kimi("build", "--config", str(cfg))
    err = assert_refused(r, 3, "tensorrt_llm", str(tmp_path / "engine" / "checkpoint"))
    assert f"kimi-trt build --config {cfg}" in err
    assert "int8_wo requantisation error" in r.stderr  # the converter's error is reported
    assert read_rank_config(tmp_path / "engine" / "checkpoint").formats.experts == "int8_wo"
    # Rerun: plan and convert verify and are skipped; compile stops the same way.
    r2 = kimi("build", "--config", str(cfg))
    assert_refused(r2, 3, "tensorrt_llm")
    assert "[convert] skipped" in r2.stderr


def test_stop_after_rejects_unknown_stage(tmp_path):
    r = kimi("build", "--config", str(tmp_path / "x.yaml"), "--stop-after", "link")
    assert r.returncode == 2 and "link" in r.stderr


def test_output_dir_holding_other_files_is_refused(tiny_ckpt, tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "notes.txt").write_text("mine")
    cfg = write_config(tmp_path, "tiny_cpu_tp2", tiny_ckpt)
    assert_refused(kimi("build", "--config", str(cfg)), 2, "not written by kimi-trt build")
    assert sorted(p.name for p in (tmp_path / "engine").iterdir()) == ["notes.txt"]


def test_build_under_mpirun_compiles_after_a_single_process_convert(tiny_ckpt, tmp_path):
    cfg = write_config(tmp_path, "tiny_cpu_ep2", tiny_ckpt)
    mpirun = [str(Path(sys.executable).parent / "mpirun"), "-np", "2", "--oversubscribe"]
    env = {**cli_env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    build = [*mpirun, sys.executable, "-m", "kimi_trt.cli", "build", "--config", str(cfg)]
    r = subprocess.run(build, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "--stop-after convert` as one process first" in r.stderr
    assert kimi("build", "--config", str(cfg), "--stop-after", "convert").returncode == 0
    r = subprocess.run(build, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert {"rank0.safetensors", "rank1.safetensors"} <= set(manifest["files"])
    again, _ = quiet_build(cfg)
    assert again.ran == []  # what the MPI run recorded verifies in a plain rerun
