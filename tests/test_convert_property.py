"""Property tests over random valid DeepSeek-V3 configs x layouts x weight formats.

Configs are drawn the way real DeepSeek-V3-architecture checkpoints differ from Kimi-K2:
q_lora_rank in {None (a direct q_proj), 64, 96, 128, 192}, moe_intermediate_size and
intermediate_size not multiples of 128, kv_a (kv_lora_rank + rope) ending in a partial
block, 1-4 expert groups, 0-2 dense layers, FP8 (128- or 32-blocks) or BF16 sources, vocab
sizes that the TP group does not divide, tied embeddings. Layouts: world 1, TP2
(moe_tp 2), EP2, TP2 with attention DP, TP4 (moe_tp 2 x ep 2).

(a) `test_written_tensors_within_stated_error`: every written tensor, decoded, equals its
    source where the manifest says exact and is within its stated max_rel_err otherwise.
(b) `test_executor_under_mpirun_matches_transformers`: one drawn case per layout, run by
    the torch executor (world 1 in process, the world-2 cases in one mpirun, TP4 in
    another), against transformers' DeepseekV3 holding the written weights decoded: the
    weights are within the manifest's stated error of the source by (a), the logits within
    1e-4 of the logit scale of that model (for an all-exact conversion that model *is* the
    source model), greedy tokens equal wherever the margin is not a near-tie. Bounded cost:
    a fixed handful of cases, three launches.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from kimi_trt.config import ModelConfig, Parallelism, WeightFormats
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint
from kimi_trt.runtime.engine import load_engine
from kimi_trt.testing.hf_reference import reference_model
from tests.convert_support import check_written, convert_and_check
from tests.runtime_job import collect
from tests.runtime_support import LAYOUTS, assert_like_transformers, mpi_collect

PROPERTY_LAYOUTS = ("w1", "tp2", "ep2", "dp2", "tp4")
FORMAT = st.sampled_from(["fp8_block", "fp8_ue8m0", "int8_wo", "bf16", "fp32"])
FORMATS = st.builds(
    WeightFormats,
    attention=FORMAT,
    dense_mlp=FORMAT,
    shared_expert=st.one_of(st.none(), FORMAT),
    experts=FORMAT,
    embeddings=st.sampled_from(["bf16", "fp32"]),
)
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@st.composite
def experts_fields(draw, ep: int) -> dict:
    """Groups of >= 2 experts (noaux_tc scores a group by its top two), divisible by ep."""
    n_group = draw(st.integers(1, 4))
    per_group = draw(st.sampled_from([p for p in (2, 3, 4) if n_group * p % ep == 0]))
    topk_group = draw(st.integers(1, n_group))
    return {
        "n_group": n_group,
        "n_routed_experts": n_group * per_group,
        "topk_group": topk_group,
        "num_experts_per_tok": draw(st.integers(1, min(4, topk_group * per_group))),
        "n_shared_experts": draw(st.sampled_from([1, 2])),
        "norm_topk_prob": draw(st.booleans()),
        "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
    }


@st.composite
def model_configs(draw, layout: str) -> tuple[ModelConfig, int]:
    """(a valid config that splits over `layout`, synth seed)."""
    par = Parallelism(**LAYOUTS[layout])
    attn = 1 if par.attention_dp else par.tp
    dense = draw(st.integers(0, 2))
    fields = {
        "hidden_size": draw(st.sampled_from([64, 96, 160, 256])),
        "num_attention_heads": draw(st.sampled_from([h for h in (2, 4, 6, 8) if h % attn == 0])),
        "q_lora_rank": draw(st.sampled_from([None, 64, 96, 128, 192])),
        "kv_lora_rank": draw(st.sampled_from([32, 48, 96, 160])),
        "qk_rope_head_dim": draw(st.sampled_from([16, 32])),
        "qk_nope_head_dim": draw(st.sampled_from([16, 32, 48])),
        "v_head_dim": draw(st.sampled_from([16, 32, 48])),
        "moe_intermediate_size": draw(st.sampled_from([24, 40, 96, 136, 200])),
        "intermediate_size": draw(st.sampled_from([64, 200, 328, 448])),
        "first_k_dense_replace": dense,
        "num_hidden_layers": dense + draw(st.integers(1, 2)),
        "vocab_size": draw(st.sampled_from([250, 257, 301, 384])),
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": draw(st.booleans()),
        "rope_scaling": draw(st.sampled_from([None, YARN])),
        **draw(experts_fields(par.ep)),
    }
    fp8 = draw(st.booleans())
    if fp8:
        block = draw(st.sampled_from([128, 32]))
        fields["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [block, block],
        }
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    return preset_config("tiny", fp8=fp8, overrides=fields), draw(st.integers(0, 2**16))


def synth(cfg: ModelConfig, seed: int, root: Path) -> Path:
    out = root / f"ckpt-{seed}-{cfg.config_hash()}"
    if not (out / "config.json").exists():
        write_synthetic_checkpoint(cfg, out, seed=seed, progress=False)
    return out


@st.composite
def cases(draw, layouts=PROPERTY_LAYOUTS) -> list[tuple[str, ModelConfig, int, WeightFormats]]:
    return [(lay, *draw(model_configs(lay)), draw(FORMATS)) for lay in layouts]


@settings(
    max_examples=16,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=st.sampled_from(PROPERTY_LAYOUTS).flatmap(lambda lay: cases((lay,))))
def test_written_tensors_within_stated_error(case):
    ((layout, cfg, seed, formats),) = case
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synth(cfg, seed, Path(tmp))
        convert_and_check(ckpt, Parallelism(**LAYOUTS[layout]), formats)


STEPS = 6
# Every drawn vocab (>= 250) holds these ids; lengths differ so batches pack unevenly.
PROMPTS = [[5, 17, 200, 42, 99], [11, 12], [240, 1, 64, 2, 150, 3, 77, 4, 123]]


def covers_variants(drawn) -> bool:
    """One batch holds both attention variants (q LoRA / q_proj), both source kinds (FP8 /
    BF16), and decode with an exact and a bf16-rounded absorbed q projection."""
    cfgs = [c for _, c, _, _ in drawn]
    attention = {f.attention == "fp32" for _, _, _, f in drawn}
    return (
        {c.q_lora_rank is None for c in cfgs} == {True, False}
        and {c.is_fp8 for c in cfgs} == {True, False}
        and attention == {True, False}
    )


def _prepare(case, root: Path) -> tuple[Path, object, bool]:
    """Convert one case; returns (per-rank dir, transformers on its decoded weights, mla exact)."""
    layout, cfg, seed, formats = case
    ckpt = synth(cfg, seed, root)
    out = root / f"out-{layout}"
    run_conversion(ckpt, out, Parallelism(**LAYOUTS[layout]), formats, progress=False, jobs=2)
    written = check_written(ckpt, out)
    manifest = json.loads((out / "manifest.json").read_text())
    mla_exact = manifest["derived_error"]["attention.fused_q_proj"]["exact"]
    return out, reference_model(cfg, written), mla_exact


@settings(
    max_examples=1,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: every run is three launches
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(drawn=cases())
def test_executor_under_mpirun_matches_transformers(drawn):
    assume(covers_variants(drawn))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = {case[0]: _prepare(case, root) for case in drawn}
        got = {"w1": collect(load_engine(prepared["w1"][0]), PROMPTS, STEPS)}
        for world, names in ((2, ("tp2", "ep2", "dp2")), (4, ("tp4",))):
            engines = {n: prepared[n][0] for n in names}
            got |= mpi_collect(world, engines, PROMPTS, STEPS, root / f"job{world}")
        for name, (_, ref, mla_exact) in prepared.items():
            assert_like_transformers(ref, got[name], PROMPTS, mla_exact)
