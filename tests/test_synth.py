import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kimi_trt.config import load_model_config
from kimi_trt.convert.fp8 import FP8_DTYPE, dequantize_block, quantize_block
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.testing.hf_reference import load_reference_model
from tests.conftest import K2_CONFIG, cli_env


def test_k2_tensor_list_matches_published_counts():
    cfg = load_model_config(K2_CONFIG)
    ts = hf_tensors(cfg)
    # kimi-k2.md: 139,644 tensors incl. 61 rotary inv_freq; 1,026,408,232,448 parameters
    assert len(ts) + 61 == 139_644
    assert sum(t.numel for t in ts if not t.is_scale) == 1_026_408_232_448
    assert sum(t.numel for t in ts if t.is_scale) == 62_495_192
    assert sum(t.nbytes for t in ts if t.dtype == FP8_DTYPE) == 1_023_893_241_856
    scale = {t.name: t.shape for t in ts if t.is_scale}
    assert scale["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == (5, 56)
    assert scale["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"] == (16, 56)


def test_fp8_block_round_trip_with_partial_blocks():
    w = np.random.default_rng(0).standard_normal((200, 300), np.float32)
    q, s = quantize_block(w, (128, 128))
    assert q.dtype == FP8_DTYPE and s.shape == (2, 3)
    back = dequantize_block(q, s, (128, 128))
    assert (np.abs(back - w) / np.abs(w).max()).max() < 0.07
    q2, s2 = quantize_block(w, (128, 128), power_of_two=True)
    assert np.array_equal(np.exp2(np.round(np.log2(s2))), s2)
    assert np.isfinite(dequantize_block(q2, s2, (128, 128))).all()


def test_fp8_block_math_matches_torch():
    """numpy + ml_dtypes FP8 math equals torch's float8_e4m3fn casts, partial blocks included."""
    from kimi_trt.torch_bridge import to_numpy

    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 3
    q, s = quantize_block(to_numpy(w), (128, 128))
    blocks = w.abs().reshape(1, 200, 300)
    amax = torch.nn.functional.pad(blocks, (0, 84, 0, 56)).reshape(2, 128, 3, 128).amax((1, 3))
    scale = amax / 448.0
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    want = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert np.array_equal(s, scale.numpy())
    assert q.view(np.uint8).tobytes() == want.view(torch.uint8).numpy().tobytes()
    back = dequantize_block(q, s, (128, 128))
    assert np.array_equal(back, (want.float() * full).numpy())


def test_synth_layout_is_kimi_k2s(tiny_ckpt):
    cfg = load_model_config(tiny_ckpt)
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    expected = {t.name: t for t in hf_tensors(cfg)}
    assert set(index["weight_map"]) == set(expected)
    files = set(index["weight_map"].values())
    assert len(files) == cfg.num_hidden_layers
    for f in files:
        with safe_open(str(tiny_ckpt / f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                assert tuple(t.get_shape()) == expected[k].shape, k
    with safe_open(
        str(tiny_ckpt / index["weight_map"]["model.layers.1.mlp.gate.e_score_correction_bias"]),
        framework="pt",
    ) as sf:
        assert (
            sf.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        )
        assert sf.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
        assert (
            sf.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").dtype
            == torch.float8_e4m3fn
        )
        # kv_a rows = 128 + 64 = 192: a partial second block
        assert sf.get_tensor(
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
        ).shape == (2, 2)


def test_synth_is_deterministic(tmp_path, tiny_ckpt):
    out = tmp_path / "again"
    r = subprocess.run(
        ["kimi-trt", "synth", "--preset", "tiny", "--seed", "0", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert r.returncode == 0, r.stderr
    for f in tiny_ckpt.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_groups_ckpt"])
def test_synth_loads_in_transformers_with_finite_logits(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    model = load_reference_model(ckpt)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.isfinite().all()
    assert 0.1 < logits.std().item() < 100
    # not degenerate: different positions predict different tokens
    assert len(set(logits[0].argmax(-1).tolist())) > 3


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for args in (
        ["inspect", str(tmp_path)],
        ["inspect", str(tmp_path / "missing")],
        ["synth", "--set", "n_group=3", "--out", str(tmp_path / "x")],
    ):
        r = subprocess.run(["kimi-trt", *args], capture_output=True, text=True, env=cli_env())
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


def test_inspect_hf_checkpoint(tiny_ckpt):
    r = subprocess.run(
        ["kimi-trt", "inspect", str(tiny_ckpt), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    info = json.loads(r.stdout)
    assert info["kind"] == "hf_checkpoint" and info["tensors"] == 163
    assert info["missing_tensors"] == [] and info["unknown_tensors"] == []
    assert info["bytes_by_class"]["experts"] > info["bytes_by_class"]["attention"]
