"""The shipped build configs and the one planner.

- every YAML header states the planner's numbers (plan_summary_line), and every shipped GPU
  config plans to FITS on a backend that can run it - on a fresh clone, without the
  checkpoint (the planner then uses the shipped Kimi-K2 config);
- `kimi-trt plan` and `kimi-trt build --stop-after plan` agree on a table of variants;
- `kimi-trt build` of each GPU config against a k2-shapes synthetic checkpoint writes a
  complete engine dir (options checked, Triton repository parsed with Triton's own schema)
  and exits 3 with the command that finishes it on a GPU host.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kimi_trt.build import run_build
from kimi_trt.cli import main
from kimi_trt.config import load_build_config
from kimi_trt.errors import ConfigError
from kimi_trt.llmapi.options import OPTIONS_FILE, read_options
from kimi_trt.plan import load_plan
from kimi_trt.plan_report import plan_summary_line
from tests.conftest import REPO, run_cli

CONFIGS = REPO / "build_configs"
GPU_CONFIGS = ["b200_ep8", "h200_ep8", "h100_ep16_2node", "h200_tp16_2node"]
LLMAPI_GPU_CONFIGS = ["b200_ep8", "h200_ep8", "h100_ep16_2node"]


kimi = partial(run_cli, timeout=600)  # kimi(*args, timeout=...) -> CompletedProcess


@pytest.mark.parametrize("name", [*GPU_CONFIGS, "tiny_gpu_llmapi"])
def test_yaml_header_states_the_planners_numbers(name):
    path = CONFIGS / f"{name}.yaml"
    plan = load_plan(path)
    assert plan.fits and not plan.unsupported, plan.reason
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert f"#   {plan_summary_line(plan)}" in header, plan_summary_line(plan)


def test_plan_of_the_headline_config_works_without_the_checkpoint():
    assert not load_build_config(CONFIGS / "b200_ep8.yaml").checkpoint.exists()
    r = kimi("plan", "--config", str(CONFIGS / "b200_ep8.yaml"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backend  llmapi" in r.stdout and "FITS" in r.stdout
    assert "planned with the shipped Kimi-K2-Instruct config" in r.stdout


# (name, changes to a tiny build YAML): backends x devices x layouts, fitting or not
VARIANTS = {
    "torch-cpu-1": {"backend": "torch", "gpu": "cpu", "kv_cache_dtype": "fp32"},
    "torch-cpu-ep2": {"backend": "torch", "gpu": "cpu", "parallelism": {"tp": 2, "ep": 2}},
    "torch-cpu-tp2": {"backend": "torch", "gpu": "cpu", "parallelism": {"tp": 2, "moe_tp": 2}},
    "torch-h200": {"backend": "torch", "gpu": "h200"},
    "torch-cpu-seq": {
        "backend": "torch",
        "gpu": "cpu",
        "limits": {"max_input_len": 8, "max_seq_len": 2_000_000_000},
    },
    "torch-h100-tp3": {"backend": "torch", "gpu": "h100", "parallelism": {"tp": 3, "ep": 3}},
    "llmapi-h200": {"backend": "llmapi", "gpu": "h200", "kv_cache_dtype": "fp8"},
    "llmapi-b200-dp": {
        "backend": "llmapi",
        "gpu": "b200",
        "parallelism": {"tp": 2, "ep": 2, "attention_dp": True},
    },
    "llmapi-cpu": {"backend": "llmapi", "gpu": "cpu"},
    "llmapi-int8": {"backend": "llmapi", "gpu": "h200", "weights": {"experts": "int8_wo"}},
    "llmapi-ue8m0-h200": {
        "backend": "llmapi",
        "gpu": "h200",
        "weights": dict.fromkeys(
            ["attention", "dense_mlp", "shared_expert", "experts"], "fp8_ue8m0"
        ),
    },
    "llmapi-ue8m0-b200": {
        "backend": "llmapi",
        "gpu": "b200",
        "weights": dict.fromkeys(
            ["attention", "dense_mlp", "shared_expert", "experts"], "fp8_ue8m0"
        ),
    },
    "trtllm-h200": {
        "backend": "trtllm",
        "gpu": "h200",
        "weights": {"attention": "bf16", "dense_mlp": "bf16", "experts": "int8_wo"},
    },
    "trtllm-b200-int8": {
        "backend": "trtllm",
        "gpu": "b200",
        "weights": {"attention": "bf16", "dense_mlp": "bf16", "experts": "int8_wo"},
    },
    "trtllm-fp8": {"backend": "trtllm", "gpu": "h200"},
}


def _variant_yaml(tmp: Path, ckpt: Path, name: str) -> Path:
    raw = {
        "checkpoint": str(ckpt),
        "output_dir": str(tmp / name),
        "limits": {"max_batch_size": 4, "max_input_len": 256, "max_seq_len": 512},
    }
    for key, value in VARIANTS[name].items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_and_build_agree_on_every_variant(tiny_ckpt, tmp_path):
    assert len(VARIANTS) >= 12
    verdicts = {}
    for name in VARIANTS:
        cfg = _variant_yaml(tmp_path, tiny_ckpt, name)
        r = CliRunner().invoke(main, ["plan", "--config", str(cfg), "--json"])
        planned = json.loads(r.stdout)
        assert r.exit_code == (0 if planned["fits"] else 2), (name, r.output)
        try:
            run_build(cfg, "plan", log=lambda s: None)
            built = json.loads((tmp_path / name / ".kimi-build" / "plan.json").read_text())
            assert built == planned, name
        except ConfigError as e:
            assert not planned["fits"], (name, str(e))
            assert planned["reason"] in str(e) and planned["reason"] in r.stderr, name
        verdicts[name] = planned["fits"]
    assert sum(verdicts.values()) >= 6 and sum(not v for v in verdicts.values()) >= 6, verdicts


@pytest.fixture(scope="module")
def k2_shapes(tmp_path_factory) -> Path:
    """Real K2 layer shapes (hidden 7168, 64 heads, MLA 512/64/128, experts 2048 wide), cut
    to 2 layers, 16 experts and an 8192-token vocabulary: ~1.6 GB."""
    out = tmp_path_factory.mktemp("k2_shapes") / "ckpt"
    r = kimi(
        "synth", "--preset", "k2-shapes", "--layers", "2", "--experts", "16", "--vocab", "8192",
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def _check_llmapi_repo(engine: Path, repo: Path) -> None:
    r = kimi("triton-repo", "--engine-dir", str(engine), "--out", str(repo))
    assert r.returncode == 0, r.stderr
    model = repo / "tensorrt_llm"
    assert sorted(p.name for p in model.rglob("*") if p.is_file()) == [
        "config.pbtxt",
        "model.py",
        "model.yaml",
    ]
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert config.parameters["engine_dir"].string_value == str(engine.resolve())
    body = yaml.safe_load((model / "1" / "model.yaml").read_text())
    assert body.pop("triton_config") == {"max_batch_size": 0, "decoupled": True}
    assert body.pop("model") == json.loads((engine / "config.json").read_text())["checkpoint"]
    assert body == read_options(engine / OPTIONS_FILE)


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_build_of_each_gpu_config_on_k2_shapes(name, k2_shapes, tmp_path):
    engine = tmp_path / "engine"
    r = kimi(
        "build", "--config", str(CONFIGS / f"{name}.yaml"),
        "--checkpoint", str(k2_shapes), "--output-dir", str(engine),
    )  # fmt: skip
    world = load_build_config(CONFIGS / f"{name}.yaml").parallelism.world_size
    assert r.returncode == 3, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "tensorrt_llm" in last, last
    if name not in LLMAPI_GPU_CONFIGS:  # the engine workflow stops after convert
        assert f"kimi-trt build --config {CONFIGS / name}.yaml" in last
        assert len(list((engine / "checkpoint").glob("rank*.safetensors"))) == world
        return
    assert f"mpirun -np {world} kimi-trt run --engine-dir {engine}" in last
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["backend"] == "llmapi" and manifest["world_size"] == world
    assert {OPTIONS_FILE, "config.json"} <= set(manifest["files"])
    options = read_options(engine / OPTIONS_FILE)
    assert options["tensor_parallel_size"] == world and options["kv_cache_config"]["dtype"] == "fp8"
    _check_llmapi_repo(engine, tmp_path / "repo")
