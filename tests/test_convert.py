"""Converter correctness: the per-rank files gathered back reproduce the HF checkpoint.

The gather (tests/convert_support.py) is written from docs/per-rank-checkpoint.md (the
inverse of each shard rule and fusion), not from the converter's transforms.
Property test over (tp, ep, moe_tp, attention_dp) and weight formats on the tiny and
tiny-groups synthetic checkpoints: fp8_block/fp32 reproduce the source exactly, lossy
formats within the manifest's reported error; every source tensor is consumed or
ignored, every target produced (the rank headers equal `rank_tensor_specs`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_trt.config import Parallelism, WeightFormats, load_model_config
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.convert.weight_table import consumed_sources, is_ignored, rank_tensor_specs
from kimi_trt.mapping import Mapping
from tests.convert_support import convert_and_check

LAYOUTS = st.sampled_from(
    [
        (1, 1, 1, False),
        (2, 2, 1, False),
        (2, 1, 2, False),
        (4, 2, 2, False),
        (4, 4, 1, True),
        (2, 2, 1, True),
        (4, 1, 4, False),
        (8, 8, 1, False),
        (2, 1, 2, True),
    ]
)
FORMATS = st.fixed_dictionaries(
    {
        "attention": st.sampled_from(["fp8_block", "bf16", "fp32"]),
        "dense_mlp": st.sampled_from(["fp8_block", "int8_wo", "fp8_ue8m0"]),
        "experts": st.sampled_from(["fp8_block", "int8_wo", "fp8_ue8m0", "bf16"]),
        "embeddings": st.sampled_from(["bf16", "fp32"]),
    }
)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(layout=LAYOUTS, formats=FORMATS, groups=st.booleans())
def test_gather_reproduces_source(tiny_ckpt, tiny_groups_ckpt, layout, formats, groups):
    tp, ep, moe_tp, adp = layout
    ckpt = tiny_groups_ckpt if groups else tiny_ckpt
    convert_and_check(
        ckpt, Parallelism(tp=tp, ep=ep, moe_tp=moe_tp, attention_dp=adp), WeightFormats(**formats)
    )


@pytest.mark.parametrize("layout", [(4, 2, 2, False), (2, 2, 1, True)])
def test_fp8_block_layouts_exact(tiny_groups_ckpt, layout):
    """The headline layouts with native FP8: every weight byte and scale reproduced exactly."""
    tp, ep, moe_tp, adp = layout
    convert_and_check(
        tiny_groups_ckpt,
        Parallelism(tp=tp, ep=ep, moe_tp=moe_tp, attention_dp=adp),
        WeightFormats(),
    )


def test_every_source_tensor_consumed_or_ignored(tiny_groups_ckpt):
    model = load_model_config(tiny_groups_ckpt)
    names = {t.name for t in hf_tensors(model)}
    assert consumed_sources(model) == names
    assert is_ignored("model.layers.0.self_attn.rotary_emb.inv_freq", model)
    mtp = model.num_hidden_layers
    assert not is_ignored(f"model.layers.{mtp}.mlp.gate.weight", model)  # no MTP layers here


def test_mtp_layers_are_ignored():
    from kimi_trt.convert.synth import preset_config

    model = preset_config("tiny", overrides={"num_nextn_predict_layers": 1})
    assert is_ignored(f"model.layers.{model.num_hidden_layers}.mlp.gate.weight", model)


def test_k2_rank_specs_match_published_shapes():
    """Kimi-K2, EP8 + attention DP: per-rank shapes of the doc's table for the real config."""
    from kimi_trt.config import load_model_config as load
    from kimi_trt.convert.synth import REFERENCE_CONFIG

    model = load(REFERENCE_CONFIG)
    mapping = Mapping(world_size=8, tp_size=8, moe_tp_size=1, moe_ep_size=8, attention_dp=True)
    specs = {t.name: t for t in rank_tensor_specs(model, mapping, WeightFormats(), 3)}
    p = "transformer.layers.1."
    assert specs[p + "attention.fused_a.weight"].shape == (1536 + 512 + 64, 7168)
    assert specs[p + "attention.fused_a.weight_scale_inv"].shape == (17, 56)
    assert specs[p + "attention.fused_q_proj"].shape == (64 * 576, 1536)
    assert specs[p + "mlp.fc.weight"].shape == (48, 4096, 7168)
    assert specs[p + "mlp.fc.weight_scale_inv"].shape == (48, 32, 56)
    assert specs[p + "mlp.proj.weight"].shape == (48, 7168, 2048)
    assert specs[p + "mlp.router.weight"].dtype == np.float32
    assert specs["lm_head.weight"].shape == (163840, 7168)
    experts = sum(t.nbytes for t in specs.values() if t.cls == "experts")
    assert experts == 60 * 48 * 3 * 7168 * 2048 + 60 * 48 * (32 * 56 + 56 * 16) * 4


def test_inspect_per_rank_checkpoint(tiny_ckpt, tmp_path):
    """`kimi-trt inspect` on a converted dir: ranks, bytes per rank and class, lossy errors."""
    from click.testing import CliRunner

    from kimi_trt.cli import main

    out = tmp_path / "out"
    args = ["convert", "--quiet", "--checkpoint", str(tiny_ckpt), "--out", str(out)]
    conv = CliRunner().invoke(main, [*args, "--tp", "2", "--format", "experts=int8_wo"])
    assert conv.exit_code == 0, conv.output
    assert "experts (int8_wo): max rel" in conv.output  # the one-screen summary
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert info["kind"] == "per_rank_checkpoint" and info["complete"]
    assert (info["world_size"], info["tp"], info["ep"], info["moe_tp"]) == (2, 2, 2, 1)
    for r, rank in enumerate(info["ranks"]):
        assert rank["bytes"] == (out / f"rank{r}.safetensors").stat().st_size
        assert rank["bytes_by_class"] == manifest["files"][f"rank{r}.safetensors"]["bytes_by_class"]
    assert info["bytes_by_class"] == {k: v for k, v in manifest["bytes_by_class"].items() if v}
    assert set(info["requant_error"]) == {"experts"}
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "rank1.safetensors" in text and "experts" in text


@pytest.mark.parametrize("fmt", ["int8_wo", "fp8_ue8m0", "bf16", "fp8_block"])
def test_chunked_encoding_equals_whole(fmt, tmp_path, monkeypatch):
    """Stored matrices are re-encoded in row chunks (bounded memory): the rank file is byte
    for byte the one written with each matrix encoded at once, with a partial last FP8
    block (dense fc of 2248 rows) and chunks that cross the up|gate boundary (experts of
    96 rows each, fp8_block requantised)."""
    from kimi_trt.convert import transforms
    from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint

    cfg = preset_config(
        "tiny", layers=2, overrides={"intermediate_size": 2248, "moe_intermediate_size": 96}
    )
    write_synthetic_checkpoint(cfg, tmp_path / "ckpt", seed=2, progress=False)
    formats = WeightFormats(attention=fmt, dense_mlp=fmt, experts=fmt)
    files = {}
    for rows in (128, 10**6):
        monkeypatch.setattr(transforms, "ENCODE_ROWS", rows)
        out = tmp_path / f"out{rows}"
        run_conversion(tmp_path / "ckpt", out, Parallelism(), formats, progress=False)
        files[rows] = (out / "rank0.safetensors").read_bytes()
    assert files[128] == files[10**6]


def test_absorption_in_head_chunks(tiny_ckpt, monkeypatch):
    """fused_q_proj computed a few heads at a time (ragged last chunk) is still exact."""
    from kimi_trt.convert import transforms

    monkeypatch.setattr(transforms, "ABSORB_HEADS", 3)
    convert_and_check(tiny_ckpt, Parallelism(tp=1, ep=1), WeightFormats(attention="fp32"))
