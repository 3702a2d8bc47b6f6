import pytest

from kimi_trt.config import load_model_config
from kimi_trt.convert.synth import preset_config
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
    # moe_tp 32: 2048 / 32 = 64 columns per rank, inside an FP8 block
    with pytest.raises(ConfigError, match="not a multiple of the FP8 block size 128"):
        check_layout(k2, Mapping(32, 32, 32, 1))


def test_tiny_presets_split_for_test_layouts():
    tiny = preset_config("tiny")
    for m in [
        Mapping(2, 2, 1, 2),
        Mapping(2, 2, 2, 1),
        Mapping(4, 4, 2, 2),
        Mapping(2, 2, 1, 2, attention_dp=True),
    ]:
        assert layout_problems(tiny, m) == [], m
