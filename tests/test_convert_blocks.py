"""Checkpoints beyond Kimi-K2's shapes: block-FP8 fusions and splits off the 128-row grid,
q_lora_rank null, BF16 sources, vocab sizes the TP group does not divide.

`moe_intermediate_size` 96 fuses up (rows 0-95) and gate (rows 96-191) of each expert into
one matrix whose first 128-row scale block straddles both: concatenating the two tensors'
FP8 bytes and scale rows would decode gate rows 0-31 with up_proj's scale. Every written
tensor, decoded with the target's own block grid, must equal its source within what the
manifest states, and the torch executor must reproduce transformers on those weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_trt.cli import main
from kimi_trt.config import Parallelism, WeightFormats, load_model_config
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint
from kimi_trt.runtime.engine import load_engine
from kimi_trt.testing.hf_reference import load_reference_model, reference_model
from tests.convert_support import check_written, convert_and_check
from tests.runtime_job import collect
from tests.runtime_support import (
    LAYOUTS,
    PROMPTS,
    assert_like_transformers,
    hf_logits,
    mpi_collect,
    rel_err,
)

FORMATS = ("fp8_block", "fp8_ue8m0", "int8_wo", "bf16", "fp32")
STEPS = 8
# The model: 3 layers (1 dense), q_lora_rank 96, moe_intermediate_size 96,
# intermediate_size 448, hidden 320, 6 heads (3 per rank at TP2: q_b rows 288, o_proj
# columns 192 per rank); kv_a = 128 + 32 rows ends in a partial block.
DONE_WHEN = {
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "q_lora_rank": 96,
    "moe_intermediate_size": 96,
    "intermediate_size": 448,
    "hidden_size": 320,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "qk_rope_head_dim": 32,
}


def all_formats(fmt: str) -> WeightFormats:
    """Every linear class in `fmt` (embeddings bf16)."""
    return WeightFormats(attention=fmt, dense_mlp=fmt, experts=fmt)


def synth(tmp_path_factory, name: str, fp8: bool = True, **fields) -> Path:
    out = tmp_path_factory.mktemp(name)
    write_synthetic_checkpoint(preset_config("tiny", fp8=fp8, overrides=fields), out, seed=5)
    return out


@pytest.fixture(scope="module")
def straddle_ckpt(tmp_path_factory) -> Path:
    """tiny with moe_intermediate_size 96: up|gate (experts, shared expert) straddle a block."""
    return synth(tmp_path_factory, "straddle", moe_intermediate_size=96)


@pytest.fixture(scope="module")
def done_ckpt(tmp_path_factory) -> Path:
    return synth(tmp_path_factory, "done-when", **DONE_WHEN)


def test_straddling_up_gate_manifest_matches_written_bytes(straddle_ckpt):
    """World 1, fp8_block: the manifest's claim (exact or max_rel_err) holds for every tensor."""
    convert_and_check(straddle_ckpt, Parallelism(), WeightFormats())


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def mla_exact(out: Path) -> bool:
    return manifest_of(out)["derived_error"]["attention.fused_q_proj"]["exact"]


def check_runs_like_transformers(ckpt: Path, out: Path, written: dict, got: dict) -> None:
    ref = reference_model(load_model_config(ckpt), written)
    assert_like_transformers(ref, got, PROMPTS, mla_exact(out))


@pytest.mark.parametrize("fmt", FORMATS)
def test_done_when_model_world1_every_format(done_ckpt, tmp_path, fmt):
    """Converts in every format; written weights within the stated error of the source and
    the executor equal to transformers holding them (to 1e-4 of the logit scale)."""
    out = tmp_path / fmt
    run_conversion(done_ckpt, out, Parallelism(), all_formats(fmt), progress=False)
    written = check_written(done_ckpt, out)
    got = collect(load_engine(out), PROMPTS, STEPS)
    check_runs_like_transformers(done_ckpt, out, written, got)
    if fmt == "fp32":  # exact: transformers on the source checkpoint itself
        source = load_reference_model(done_ckpt)
        for prompt, logits in zip(PROMPTS, got["score"], strict=True):
            assert rel_err(logits, hf_logits(source, prompt)) <= 1e-4


def test_done_when_model_tp2_bf16_and_requantised_fp8(done_ckpt, tmp_path):
    """TP2 (moe_tp 2): bf16, and fp8_block with every target whose split or fusion cuts a
    block requantised (named in the manifest); kv_b_proj (384 rows per rank) is copied."""
    outs = {}
    for fmt in ("bf16", "fp8_block"):
        out = tmp_path / fmt
        run_conversion(
            done_ckpt, out, Parallelism(**LAYOUTS["tp2"]), all_formats(fmt), progress=False
        )
        outs[fmt] = (out, check_written(done_ckpt, out))
    assert manifest_of(outs["bf16"][0])["requantised"] == {}
    assert set(manifest_of(outs["fp8_block"][0])["requantised"]) == {
        "attention.fused_a (attention)",
        "attention.q_b_proj (attention)",
        "attention.dense (attention)",
        "mlp.fc (dense_mlp)",
        "mlp.gate (dense_mlp)",
        "mlp.proj (dense_mlp)",
        "mlp.fc (experts)",
        "mlp.proj (experts)",
        "mlp.shared_expert.fc (shared_expert)",
        "mlp.shared_expert.proj (shared_expert)",
    }
    got = mpi_collect(2, {f: o for f, (o, _) in outs.items()}, PROMPTS, STEPS, tmp_path / "job")
    for fmt, (out, written) in outs.items():
        check_runs_like_transformers(done_ckpt, out, written, got[fmt])


@pytest.fixture(scope="module")
def q_proj_ckpt(tmp_path_factory) -> Path:
    """q_lora_rank null (Moonlight-16B-A3B's attention: a direct q_proj, fused_a = kv_a)."""
    return synth(tmp_path_factory, "q-proj", q_lora_rank=None, moe_intermediate_size=96)


@pytest.mark.parametrize("fmt", ["fp8_block", "fp32"])
def test_q_proj_model_matches_transformers(q_proj_ckpt, tmp_path, fmt):
    out = tmp_path / fmt
    run_conversion(q_proj_ckpt, out, Parallelism(), all_formats(fmt), progress=False)
    written = check_written(q_proj_ckpt, out)
    got = collect(load_engine(out), PROMPTS, STEPS)
    check_runs_like_transformers(q_proj_ckpt, out, written, got)


def test_bf16_source_converts_to_every_format(tmp_path_factory):
    """A BF16 checkpoint (no quantization_config): every format at world 1, fp8 ones
    quantised; fp8_block and bf16 at TP2."""
    ckpt = synth(tmp_path_factory, "bf16-src", fp8=False, moe_intermediate_size=96)
    for fmt in FORMATS:
        convert_and_check(ckpt, Parallelism(), all_formats(fmt))
    for fmt in ("fp8_block", "bf16"):
        convert_and_check(ckpt, Parallelism(**LAYOUTS["tp2"]), all_formats(fmt))


def test_vocab_not_divisible_by_tp(tmp_path_factory):
    """vocab 1283 at TP4: padded with zero rows to 1284, every rank holding 321 rows."""
    ckpt = synth(tmp_path_factory, "odd-vocab", vocab_size=1283)
    convert_and_check(ckpt, Parallelism(**LAYOUTS["tp4"]), WeightFormats())


def test_cli_format_all_and_requantised_summary(straddle_ckpt, tmp_path):
    """`--format all=FMT`: classes that cannot take FMT keep their default, said in the
    summary; an explicit CLASS=FORMAT wins. Requantised targets are listed with the reason."""
    args = ["convert", "--quiet", "--checkpoint", str(straddle_ckpt)]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--format", "all=int8_wo"])
    assert res.exit_code == 0, res.output
    assert "note     embeddings keeps bf16: it cannot be stored as int8_wo" in res.output
    assert manifest_of(tmp_path / "a")["weight_formats"] == {
        "attention": "int8_wo",
        "dense_mlp": "int8_wo",
        "shared_expert": "int8_wo",
        "experts": "int8_wo",
        "embeddings": "bf16",
    }
    res = CliRunner().invoke(
        main,
        [
            *args,
            "--out",
            str(tmp_path / "b"),
            "--format",
            "experts=bf16",
            "--format",
            "all=fp8_block",
        ],
    )
    assert res.exit_code == 0, res.output
    formats = manifest_of(tmp_path / "b")["weight_formats"]
    assert formats["experts"] == "bf16" and formats["attention"] == "fp8_block"
    assert "requant  mlp.shared_expert.fc (shared_expert): FP8 blocks do not line up" in res.output
    assert "mlp.shared_experts.gate_proj starts at row 96" in res.output
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--format", "all=fp7"])
    assert bad.exit_code == 2 and "--format all='fp7': not a weight format" in bad.stderr
