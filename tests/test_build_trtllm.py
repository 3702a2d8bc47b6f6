"""The TensorRT-LLM side of the build that runs without TensorRT-LLM: format/layout support
rules, the checkpoint -> network weight adaptation, engine-build settings, shipped configs,
and the rank-file loader model.py uses (a corrupt rank file: one line naming file and tensor)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kimi_trt.config import load_build_config, load_model_config
from kimi_trt.convert.converter import convert_checkpoint
from kimi_trt.errors import CheckpointError
from kimi_trt.plan import make_plan
from kimi_trt.support import support_notes, support_problems
from kimi_trt.trtllm.compile import (
    build_settings,
    missing_capability,
    prepare_trtllm_checkpoint,
    rank_assignment,
    trtllm_build_command,
    trtllm_pretrained_dict,
)
from kimi_trt.trtllm.weights import MlaDims, adapt_rank_weights, k_b_proj_trans, kv_b_trtllm
from tests import bad_inputs_support as bad
from tests.conftest import K2_CONFIG, REPO

GPU_CONFIGS = ["b200_ep8", "h200_ep8", "h200_tp16_2node", "h100_ep16_2node"]


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_are_supported_and_fit(name):
    build = load_build_config(REPO / "build_configs" / f"{name}.yaml")
    # Deployments run on TensorRT-LLM's PyTorch backend; the engine workflow is kept for
    # Hopper only (experimental, see the YAML).
    assert build.backend == ("trtllm" if name == "h200_tp16_2node" else "llmapi")
    k2 = load_model_config(K2_CONFIG)
    assert support_problems(build, k2) == []
    plan = make_plan(build, k2)
    assert plan.fits, plan.reason
    assert str(build.checkpoint).startswith(str(REPO))  # relative paths resolve from the YAML


def test_blackwell_and_odd_mla_sizes_are_flagged_not_refused(tiny_ckpt):
    h200 = load_build_config(REPO / "build_configs" / "h200_tp16_2node.yaml")
    bf16 = h200.weights.model_copy(update={"experts": "bf16"})
    build = h200.model_copy(update={"gpu": "b200", "weights": bf16})
    k2, tiny = load_model_config(K2_CONFIG), load_model_config(tiny_ckpt)
    assert support_problems(build, k2) == []
    notes = support_notes(build, k2)
    assert len(notes) == 1 and "sm100" in notes[0]
    assert support_notes(h200, k2) == []
    assert "kv_lora_rank" in support_notes(h200, tiny)[0]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"gpu": "cpu"}, ["needs a GPU"]),
        ({"weights": {"attention": "fp8_block"}}, ["weights.attention", "gpt_attention"]),
        ({"weights": {"experts": "fp8_block"}}, ["weights.experts", "MixtureOfExperts"]),
        ({"parallelism": {"tp": 16, "ep": 16, "attention_dp": True}}, ["attention_dp"]),
        ({"kv_cache_dtype": "fp8"}, ["kv_cache_dtype"]),
        ({"gpu": "b200"}, ["int8_wo on b200", "SM>=100"]),
    ],
)
def test_trtllm_support_rules(change, words):
    base = load_build_config(REPO / "build_configs" / "h200_tp16_2node.yaml")
    raw = base.model_dump()
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    problems = support_problems(type(base).model_validate(raw), load_model_config(K2_CONFIG))
    assert len(problems) == 1 and all(w in problems[0] for w in words), problems


def _kv_b(d: MlaDims) -> torch.Tensor:
    return torch.randn(d.heads * (d.nope + d.v), d.kv_lora)


def test_kv_b_reorder_and_k_b_proj_trans():
    d = MlaDims(heads=3, nope=4, v=5, kv_lora=6)
    w = _kv_b(d)
    per_head = w.view(3, 9, 6)
    out = kv_b_trtllm(w, d)
    assert out.shape == (3 * 9, 6)
    for n in range(3):
        assert torch.equal(out[n * 4 : (n + 1) * 4], per_head[n, :4])  # k_nope block
        assert torch.equal(out[12 + n * 5 : 12 + (n + 1) * 5], per_head[n, 4:])  # v block
    kt = k_b_proj_trans(w, d).view(3, 6, 4)
    for n in range(3):
        assert torch.equal(kt[n], per_head[n, :4].T)
    with pytest.raises(CheckpointError, match="kv_b_proj"):
        kv_b_trtllm(w[:-1], d)


def test_adapt_rank_weights_on_a_converted_rank(tiny_ckpt, tmp_path):
    """Real converter output (int8_wo experts, bf16 rest) -> the names/layouts the network declares."""
    fmts = {"attention": "bf16", "dense_mlp": "bf16", "experts": "int8_wo"}
    from kimi_trt.config import Parallelism, WeightFormats

    convert_checkpoint(
        tiny_ckpt, tmp_path, Parallelism(tp=2, ep=2), WeightFormats(**fmts), progress=False
    )
    w = load_file(tmp_path / "rank1.safetensors")
    cfg = load_model_config(tiny_ckpt)
    d = MlaDims(
        cfg.num_attention_heads // 2, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    )
    layer = f"transformer.layers.{cfg.first_k_dense_replace}."
    fc = layer + "mlp.fc.weight"
    e_local, two_i, h = w[fc].shape
    required = {
        layer + "attention.kv_b_proj": (d.heads * (d.nope + d.v), d.kv_lora),
        layer + "attention.k_b_proj_trans": (d.heads * d.kv_lora, d.nope),
        fc: (e_local, h, two_i),
        layer + "mlp.fc.per_channel_scale": (e_local, two_i),
    }
    trt_ckpt = prepare_trtllm_checkpoint(tmp_path, tmp_path / "trt")
    assert (trt_ckpt / "rank1.safetensors").resolve() == (tmp_path / "rank1.safetensors").resolve()
    trt_cfg = json.loads((trt_ckpt / "config.json").read_text())
    assert trt_cfg["quantization"]["quant_algo"] is None
    assert trt_cfg["kimi_trt"]["weight_formats"]["experts"] == "int8_wo"

    out = adapt_rank_weights(w, required, d, torch.bfloat16, preprocess_int8=lambda q: q)
    assert torch.equal(out[fc], w[fc].transpose(1, 2))
    assert out[layer + "mlp.fc.per_channel_scale"].dtype == torch.bfloat16
    assert layer + "attention.q_b_proj" in out and layer + "attention.q_b_proj.weight" not in out
    assert torch.equal(
        out[layer + "attention.kv_b_proj"], kv_b_trtllm(w[layer + "attention.kv_b_proj.weight"], d)
    )
    with pytest.raises(CheckpointError, match="does not provide"):
        adapt_rank_weights(w, {**required, "lm_head.extra": (1,)}, d, torch.bfloat16, lambda q: q)
    with pytest.raises(CheckpointError, match="preprocessing"):
        adapt_rank_weights(w, required, d, torch.bfloat16, None)


def test_engine_build_settings_and_command(tmp_path):
    build = load_build_config(REPO / "build_configs" / "b200_ep8.yaml")
    s = build_settings(build)
    assert s["build_config"]["max_seq_len"] == build.limits.max_seq_len
    assert s["plugins"]["moe_plugin"] == "bfloat16"
    cmd = trtllm_build_command(tmp_path / "ckpt", tmp_path / "eng", build)
    assert cmd[0] == "trtllm-build" and "KimiK2ForCausalLM" in cmd
    assert cmd[cmd.index("--model_cls_file") + 1].endswith("kimi_trt/trtllm/model.py")


def test_pretrained_dict_drops_informational_quant_and_extra_mapping_keys():
    raw = {
        "architecture": "KimiK2ForCausalLM",
        "quantization": {"quant_algo": "MIXED_PRECISION"},
        "mapping": {"world_size": 8, "tp_size": 8, "pp_size": 1, "moe_tp_size": 1,
                    "moe_ep_size": 8, "attn_tp_size": 8, "enable_attention_dp": False},
        "kimi_trt": {"weight_formats": {}},
    }  # fmt: skip
    out = trtllm_pretrained_dict(raw)
    assert out["quantization"]["quant_algo"] is None
    assert set(out["mapping"]) == {"world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size"}
    assert (
        out["kimi_trt"] is raw["kimi_trt"]
        and raw["quantization"]["quant_algo"] == "MIXED_PRECISION"
    )


def test_rank_assignment():
    assert rank_assignment(16, 8) == {r: r % 8 for r in range(16)}
    assert rank_assignment(4, 8, mpi_rank=1, mpi_size=2) == {1: 1, 3: 1}
    with pytest.raises(ValueError):
        rank_assignment(2, 0)


def test_missing_capability_names_what_is_missing():
    reason = missing_capability()
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        assert reason == "tensorrt_llm is not installed"


# ---- rank files as the TensorRT-LLM model loads them ----------------------------------------


@pytest.fixture(scope="module")
def trt_ckpt(tiny_ckpt, tmp_path_factory):
    """A TP2 per-rank checkpoint prepared as TensorRT-LLM reads it (links to the rank files)."""
    from kimi_trt.config import Parallelism, WeightFormats

    root = tmp_path_factory.mktemp("trt_rank_files")
    fmts = WeightFormats(attention="bf16", dense_mlp="bf16", experts="int8_wo")
    convert_checkpoint(tiny_ckpt, root / "ranks", Parallelism(tp=2, ep=2), fmts, progress=False)
    return prepare_trtllm_checkpoint(root / "ranks", root / "trt")


def _same_size_dtype(h: dict) -> dict:
    """The first tensor relabelled with another dtype of its element size: a header that is
    valid on its own but does not hold what the weight table says."""
    swap = {"BF16": "F16", "F16": "BF16", "F32": "I32", "I32": "F32", "I8": "U8", "U8": "I8"}
    entry = h[bad.first(h)]
    entry["dtype"] = swap.get(entry["dtype"], "I8")
    return h


@pytest.mark.parametrize(
    "surgery, fragment",
    [
        (lambda p: bad.edit_header(p, lambda h: [h]), "a JSON list"),
        (lambda p: bad.write_raw(p, bad.deep_json(), bad.split(p)[1]), "nested too deeply"),
        (lambda p: bad.edit_header(p, bad.overlap), "overlaps tensor"),
        (
            lambda p: bad.edit_header(
                p, bad.set_entry(bad.first, shape=lambda e: [e["shape"][0] + 1, *e["shape"][1:]])
            ),
            "needs",
        ),
        (lambda p: bad.edit_header(p, bad.set_entry(bad.first, dtype="F4")), "unknown"),
        (lambda p: p.write_bytes(p.read_bytes()[:-64]), "truncated"),
        (lambda p: bad.edit_header(p, _same_size_dtype), "expected"),
    ],
    ids=[
        "header-a-list",
        "nested-10000-deep",
        "overlapping-offsets",
        "offsets-shorter-than-shape",
        "unknown-dtype",
        "truncated",
        "valid-header-wrong-dtype",
    ],
)
def test_a_corrupt_rank_file_is_one_line_naming_it_before_tensorrt_llm_loads(
    trt_ckpt, tmp_path, surgery, fragment
):
    """`KimiK2ForCausalLM.from_checkpoint`'s loader: safetensors' load_file said e.g.
    "invalid shape, data type, or offset for tensor" - no file, no tensor name."""
    import shutil

    from kimi_trt.trtllm.weights import load_rank_weights

    ckpt = shutil.copytree(trt_ckpt, tmp_path / "trt")  # rank files copied, not linked
    rank1 = ckpt / "rank1.safetensors"
    surgery(rank1)
    with pytest.raises(CheckpointError) as e:
        load_rank_weights(ckpt, 1)
    msg = str(e.value)
    assert msg.startswith(f"{rank1}: ") and fragment in msg and "\n" not in msg, msg
    assert load_rank_weights(ckpt, 0).keys() == load_file(ckpt / "rank0.safetensors").keys()


def test_a_good_rank_file_loads_whole_and_model_py_loads_through_the_check(trt_ckpt):
    import ast

    from kimi_trt.trtllm.weights import load_rank_weights

    got, want = load_rank_weights(trt_ckpt, 1), load_file(trt_ckpt / "rank1.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # model.py needs tensorrt_llm to import; its source must load rank files only this way.
    tree = ast.parse((REPO / "kimi_trt" / "trtllm" / "model.py").read_text())
    called = {
        n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
    }
    assert "load_rank_weights" in called and "load_file" not in called
