"""GPU: `kimi-trt build` the tiny model into a TensorRT-LLM engine and check its logits.

Skipped (reason printed by pytest -ra) without CUDA or without tensorrt_llm. The engine's
per-step generation logits are compared with transformers' DeepseekV3 (float32, same
dequantised weights) run teacher-forced on the prompt + the engine's own tokens, so one
near-tie flip cannot make every later step incomparable. Runner API:
`tensorrt_llm/runtime/model_runner.py` (`ModelRunner.from_dir`, `generate(...,
output_generation_logits=True, return_dict=True)`).
"""

from __future__ import annotations

import pytest
import torch
import yaml

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: TensorRT-LLM engine tests need one", allow_module_level=True)
pytest.importorskip(
    "tensorrt_llm", reason="tensorrt_llm is not installed (pip install 'kimi_trt[trtllm]')"
)

from kimi_trt.build import run_build  # noqa: E402
from kimi_trt.config import load_model_config  # noqa: E402
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402
from kimi_trt.testing.hf_reference import load_reference_model  # noqa: E402

# TensorRT-LLM's MLA kernels are specialised for DeepSeek's head sizes (latent 512 +
# rope 64 = one 576-wide KV head, nope/v 128): the tiny model gets exactly those.
K2_MLA = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "v_head_dim": 128}
PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3]
STEPS = 6


def _gpu_name() -> str:
    major, _ = torch.cuda.get_device_capability()
    return "b200" if major >= 10 else ("h200" if "H200" in torch.cuda.get_device_name() else "h100")


@pytest.fixture(scope="module")
def mla_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_k2_mla")
    write_synthetic_checkpoint(preset_config("tiny", overrides=K2_MLA), out, seed=0, progress=False)
    return out


def _build(ckpt, tmp_path, experts: str):
    cfg = {
        "checkpoint": str(ckpt),
        "output_dir": str(tmp_path / "engine"),
        "gpu": _gpu_name(),
        "backend": "trtllm",
        "parallelism": {"tp": 1},
        "weights": {"attention": "bf16", "dense_mlp": "bf16", "experts": experts},
        "kv_cache_dtype": "bf16",
        "limits": {
            "max_batch_size": 2,
            "max_input_len": 64,
            "max_seq_len": 128,
            "max_num_tokens": 256,
        },
    }
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_build(path)
    return tmp_path / "engine"


@pytest.mark.gpu
@pytest.mark.parametrize("experts, min_cos", [("bf16", 0.995), ("int8_wo", 0.98)])
def test_engine_logits_match_transformers(mla_ckpt, tmp_path, experts, min_cos):
    from tensorrt_llm.runtime import ModelRunner

    engine_dir = _build(mla_ckpt, tmp_path, experts)
    model_cfg = load_model_config(mla_ckpt)
    runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
    out = runner.generate(
        [torch.tensor(PROMPT, dtype=torch.int32)],
        max_new_tokens=STEPS,
        end_id=model_cfg.eos_token_id,
        pad_id=0,
        output_generation_logits=True,
        return_dict=True,
    )
    tokens = out["output_ids"][0, 0, len(PROMPT) :].tolist()[:STEPS]
    logits = (
        torch.as_tensor(out["generation_logits"][0])
        .float()
        .reshape(-1, out["generation_logits"][0].shape[-1])
    )
    steps = min(len(tokens), logits.shape[0])
    assert steps >= 1
    logits = logits[:steps, : model_cfg.vocab_size].cpu()

    ref_model = load_reference_model(mla_ckpt)
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT + tokens[: steps - 1]])).logits[0, len(PROMPT) - 1 :]
    cos = torch.nn.functional.cosine_similarity(logits, ref.float(), dim=-1)
    assert cos.min().item() >= min_cos, cos
    assert tokens[0] == int(ref[0].argmax())
