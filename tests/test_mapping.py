import pytest

from kimi_trt.config import WeightFormats, load_model_config
from kimi_trt.convert.synth import preset_config
from kimi_trt.convert.units import requantisation_plan
from kimi_trt.errors import ConfigError
from kimi_trt.mapping import Mapping, check_layout, layout_problems
from tests.conftest import K2_CONFIG


@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 1), (2, 2), (4, 2), (8, 8), (8, 4), (16, 8)])
def test_rank_decomposition_matches_trtllm_semantics(tp, ep):
    m = Mapping(world_size=tp, tp_size=tp, moe_tp_size=tp // ep, moe_ep_size=ep)
    experts = {}
    for rank in range(tp):
        assert m.tp_rank(rank) == rank % tp
        assert m.moe_ep_rank(rank) == rank % ep
        assert m.moe_tp_rank(rank) == rank // ep
        experts.setdefault(m.moe_tp_rank(rank), []).extend(m.experts_of(rank, 384))
    # every moe_tp slice of ranks covers every expert exactly once, in contiguous blocks
    for owned in experts.values():
        assert sorted(owned) == list(range(384))
    assert list(Mapping(8, 8, 1, 8).experts_of(3, 384)) == list(range(144, 192))


def test_mapping_round_trips_trtllm_dict():
    m = Mapping(world_size=4, tp_size=4, moe_tp_size=2, moe_ep_size=2, attention_dp=True)
    assert Mapping.from_trtllm_dict(m.to_trtllm_dict()) == m
    assert m.attn_tp_size == 1 and m.attn_tp_rank(3) == 0


def test_inconsistent_mapping_is_refused():
    with pytest.raises(ConfigError, match="moe_tp"):
        Mapping(world_size=8, tp_size=8, moe_tp_size=1, moe_ep_size=4)


def test_k2_layouts():
    k2 = load_model_config(K2_CONFIG)
    assert layout_problems(k2, Mapping(8, 8, 1, 8)) == []
    assert layout_problems(k2, Mapping(16, 16, 2, 8)) == []
    assert layout_problems(k2, Mapping(16, 16, 1, 16, attention_dp=True)) == []
    # 384 experts cannot be split 7 ways; 64 heads cannot be split 7 ways either
    problems = layout_problems(k2, Mapping(7, 7, 1, 7))
    assert any("n_routed_experts=384 is not divisible by 7" in p for p in problems)
    assert any("num_attention_heads=64" in p for p in problems)
    # moe_tp 32: 2048 / 32 = 64 rows/columns per rank, inside an FP8 block: the layout
    # fits; fp8_block experts are requantised (the real layouts copy every byte)
    odd = Mapping(32, 32, 32, 1, attention_dp=True)
    assert layout_problems(k2, odd) == []
    plan = requantisation_plan(k2, odd, WeightFormats())
    assert set(plan) == {"mlp.fc (experts)", "mlp.proj (experts)"}
    assert "split at column 64, inside a 128-column FP8 block" in plan["mlp.proj (experts)"]
    for m in (Mapping(8, 8, 1, 8), Mapping(16, 16, 2, 8), Mapping(8, 8, 1, 8, attention_dp=True)):
        assert requantisation_plan(k2, m, WeightFormats()) == {}


def test_head_count_not_divisible_is_one_clear_line():
    cfg = preset_config("tiny", overrides={"num_attention_heads": 6})
    with pytest.raises(ConfigError) as e:
        check_layout(cfg, Mapping(4, 4, 1, 4))
    msg = str(e.value)
    assert "\n" not in msg
    assert "num_attention_heads=6 is not divisible by 4 (attention-TP ranks" in msg
    assert "--attention-dp" in msg
    assert layout_problems(cfg, Mapping(4, 4, 1, 4, attention_dp=True)) == []


def test_tiny_presets_split_for_test_layouts():
    tiny = preset_config("tiny")
    for m in [
        Mapping(2, 2, 1, 2),
        Mapping(2, 2, 2, 1),
        Mapping(4, 4, 2, 2),
        Mapping(2, 2, 1, 2, attention_dp=True),
    ]:
        assert layout_problems(tiny, m) == [], m
