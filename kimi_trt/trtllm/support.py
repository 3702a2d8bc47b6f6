"""What TensorRT-LLM's engine workflow can run: weight formats, layouts, devices.

Checked by the planner (kimi_trt.support, for `plan` and the build's plan stage alike),
before any weight is read, so a config the plugins cannot take fails in a second with one
line instead of after an hour of conversion. The engine workflow is Hopper-only and
experimental (docs/design.md "Backends"); K2 deployments use backend llmapi.
The facts, from TensorRT-LLM 1.2's sources:

- MLA (`tensorrt_llm/layers/attention.py`, `DeepseekV2Attention.forward`): the
  `gpt_attention` plugin receives `fused_q_proj`, `q_b_proj` and `kv_b_proj` as plain
  tensors in the model dtype; no quantized form is accepted -> attention must be bf16.
- MoE (`tensorrt_llm/layers/moe.py`, `_moe_plugin` / `MOEWeightWrapper`): the
  `MixtureOfExperts` plugin takes bf16/fp16, weight-only int8/int4 with per-channel
  scales, per-tensor FP8 (activation scale needed), group-wise AWQ or NVFP4 - no
  128x128 block-scaled FP8 -> experts must be bf16 or int8_wo.
- Dense/shared MLPs (`tensorrt_llm/quantization/quantize.py`, `weight_only_quantize`):
  Linear layers become weight-only int8 layers -> bf16 or int8_wo.
- Attention data parallelism exists only in TensorRT-LLM's PyTorch backend; the engine
  workflow splits heads over TP (`DeepseekV2Attention(tp_size=...)`).
- Blackwell: `tensorrt_llm/builder.py` `build()` raises "INT8/INT4 quantization is not
  supported on SM>=100", and examples/models/contrib/deepseek_v2/README.md states the
  MLA kernel is Hopper-only -> no int8_wo on b200/gb200 (and a logged caveat for MLA).
- FP8 KV cache needs per-layer KV scales (`kv_cache_scaling_factor`) that the converter
  does not produce -> bf16 KV cache.
"""

from __future__ import annotations

from kimi_trt.config import LINEAR_CLASSES, BuildConfig, ModelConfig

TRTLLM_FORMATS: dict[str, tuple[str, ...]] = {
    "attention": ("bf16",),
    "dense_mlp": ("bf16", "int8_wo"),
    "shared_expert": ("bf16", "int8_wo"),
    "experts": ("bf16", "int8_wo"),
}
_WHY_NOT: dict[str, str] = {
    "attention": "the gpt_attention plugin's MLA path takes fused_q_proj/q_b_proj/kv_b_proj as bf16 tensors",
    "dense_mlp": "TensorRT-LLM's GEMM layers take bf16 or weight-only int8, not block-scaled FP8",
    "shared_expert": "TensorRT-LLM's GEMM layers take bf16 or weight-only int8, not block-scaled FP8",
    "experts": "TensorRT-LLM's MixtureOfExperts plugin takes bf16, weight-only int8 or per-tensor FP8, not 128x128 block-scaled FP8",
}
BLACKWELL = ("b200", "gb200")


def trtllm_problems(build: BuildConfig) -> list[str]:
    """Why TensorRT-LLM engines cannot be built from this config (empty: they can)."""
    out: list[str] = []
    if build.gpu == "cpu":
        out.append("backend trtllm needs a GPU (gpu: cpu); use backend: torch on CPU hosts")
    for cls in LINEAR_CLASSES:
        fmt = build.weights.for_class(cls)
        allowed = TRTLLM_FORMATS[cls]
        if fmt not in allowed:
            out.append(
                f"weights.{cls}: {fmt} cannot be used with backend trtllm ({_WHY_NOT[cls]}); "
                f"use {' or '.join(allowed)}"
            )
    if build.weights.embeddings != "bf16":
        out.append(
            f"weights.embeddings: {build.weights.embeddings} must be bf16 for backend trtllm"
        )
    if build.parallelism.attention_dp:
        out.append(
            "parallelism.attention_dp: TensorRT-LLM's engine workflow has no attention data "
            "parallelism (heads are split over TP); set attention_dp: false or use backend: torch"
        )
    wo = [c for c in LINEAR_CLASSES if build.weights.for_class(c) == "int8_wo"]
    if wo and build.gpu in BLACKWELL:
        out.append(
            f"weights {', '.join(wo)}: int8_wo on {build.gpu} - TensorRT-LLM's engine builder "
            "refuses INT8/INT4 weight-only quantization on SM>=100 (tensorrt_llm/builder.py "
            "build()); use backend: llmapi on Blackwell"
        )
    if build.kv_cache_dtype != "bf16":
        out.append(
            f"kv_cache_dtype: {build.kv_cache_dtype} needs KV-cache scales the converter does not "
            "write; use bf16 with backend trtllm"
        )
    return out


# Head sizes of DeepSeek-V2/V3 and Kimi-K2, the ones TensorRT-LLM's MLA kernels are built for.
DEEPSEEK_MLA = {
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
}


def trtllm_notes(build: BuildConfig, model: ModelConfig) -> list[str]:
    """Things the engine workflow allows but upstream has not confirmed (logged, not refused)."""
    notes = []
    if build.gpu in BLACKWELL:
        notes.append(
            "TensorRT-LLM's DeepSeek-V2 engine example states its MLA kernel supports Hopper "
            f"(sm90) only; {build.gpu} (sm100) in the engine workflow is unconfirmed - run "
            "tests/gpu/test_engine.py on the target first, or use backend: torch"
        )
    odd = {k: getattr(model, k) for k, v in DEEPSEEK_MLA.items() if getattr(model, k) != v}
    if odd:
        notes.append(
            f"MLA sizes {odd} differ from DeepSeek's {DEEPSEEK_MLA}, which TensorRT-LLM's MLA "
            "kernels are built for; the engine build may reject them"
        )
    return notes
