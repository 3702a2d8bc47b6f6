import json
import math

import pytest

from kimi_trt.config import load_build_config, load_model_config, model_config_from_dict
from kimi_trt.errors import ConfigError
from tests.conftest import K2_CONFIG


def k2_raw() -> dict:
    return json.loads(K2_CONFIG.read_text())


def test_real_k2_config_fields_and_derived_values():
    cfg = load_model_config(K2_CONFIG)
    assert cfg.model_type == "kimi_k2"
    assert cfg.num_hidden_layers == 61 and cfg.hidden_size == 7168
    assert cfg.n_routed_experts == 384 and cfg.num_experts_per_tok == 8
    assert cfg.weight_block_size == (128, 128)
    assert cfg.layer_kinds[0] == "dense" and set(cfg.layer_kinds[1:]) == {"moe"}
    assert cfg.mtp_layers == ()
    # kimi-k2.md: factor 32 -> m = 1.346574, scale = 0.130861
    assert cfg.softmax_scale == pytest.approx(0.130861, abs=1e-6)
    assert cfg.rope_attention_factor == pytest.approx(1.0)
    inv = cfg.rope_inv_freq()
    base = [50000.0 ** (-2 * i / 64) for i in range(32)]
    # beta_fast = beta_slow = 1: a hard step, indices 0..19 unscaled, 20..31 divided by 32.
    assert inv[:20] == pytest.approx(base[:20])
    assert inv[20:] == pytest.approx([b / 32 for b in base[20:]])


def test_factor_64_softmax_scale():
    raw = k2_raw()
    raw["rope_scaling"]["factor"] = 64.0
    raw["max_position_embeddings"] = 262144
    assert model_config_from_dict(raw).softmax_scale == pytest.approx(0.144680, abs=1e-6)


def test_deepseek_v3_style_config_with_groups_and_mtp():
    raw = k2_raw()
    raw.update(
        model_type="deepseek_v3",
        n_routed_experts=256,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=3,
        num_nextn_predict_layers=1,
    )
    cfg = model_config_from_dict(raw)
    assert cfg.experts_per_group == 32
    assert cfg.layer_kinds[:4] == ("dense", "dense", "dense", "moe")
    assert cfg.mtp_layers == (61,)
    assert cfg.to_hf_dict()["n_group"] == 8


def test_moe_layer_freq():
    raw = k2_raw()
    raw.update(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert model_config_from_dict(raw).layer_kinds == (
        "dense",
        "dense",
        "moe",
        "dense",
        "moe",
        "dense",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"n_group": 5}, "n_group=5"),
        ({"topk_group": 2}, "topk_group=2"),
        ({"scoring_func": "softmax"}, "'scoring_func'"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            "weight_block_size",
        ),
        ({"num_experts_per_tok": 400}, "num_experts_per_tok=400"),
    ],
)
def test_bad_model_configs_name_the_field(change, message):
    raw = k2_raw()
    raw.update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        model_config_from_dict(raw, src="x/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("x/config.json")


def test_missing_field_and_malformed_json(tmp_path):
    raw = k2_raw()
    del raw["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="missing required field 'kv_lora_rank'"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON at line 1"):
        load_model_config(tmp_path)
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model_config(tmp_path / "nope")


def test_config_round_trips():
    cfg = load_model_config(K2_CONFIG)
    again = model_config_from_dict(cfg.to_hf_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert math.isclose(again.routed_scaling_factor, 2.827)


BUILD_YAML = """
checkpoint: ckpt
output_dir: out
gpu: b200
backend: trtllm
parallelism: {tp: 8, ep: 8, moe_tp: 1, attention_dp: true}
weights: {attention: fp8_block, dense_mlp: fp8_block, experts: int8_wo}
kv_cache_dtype: fp8
limits: {max_batch_size: 64, max_input_len: 4096, max_seq_len: 8192, max_num_tokens: 8192}
"""


def test_build_config_resolves_paths_relative_to_yaml(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(BUILD_YAML)
    cfg = load_build_config(p)
    assert cfg.checkpoint == tmp_path / "ckpt"
    assert cfg.parallelism.world_size == 8 and cfg.parallelism.attention_dp
    assert cfg.weights.for_class("experts") == "int8_wo"
    assert cfg.weights.for_class("shared_expert") == "fp8_block"
    assert cfg.resolved_tokenizer_dir == tmp_path / "ckpt"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (BUILD_YAML + "bogus: 1\n", "unknown key 'bogus'"),
        (BUILD_YAML.replace("moe_tp: 1", "moe_tp: 1, foo: 2"), "unknown key 'parallelism.foo'"),
        (BUILD_YAML.replace("ep: 8", "ep: 4"), "ep (4) x moe_tp (1) must equal tp (8)"),
        (BUILD_YAML.replace("gpu: b200", "gpu: a100"), "gpu"),
        (BUILD_YAML.replace("checkpoint: ckpt\n", ""), "missing required key 'checkpoint'"),
        ("checkpoint: [unclosed\n", "malformed YAML at line"),
        ("- a\n- b\n", "expected a YAML mapping"),
    ],
)
def test_bad_build_yaml(tmp_path, yaml_text, message):
    p = tmp_path / "b.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_build_config(p)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
