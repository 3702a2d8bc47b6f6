"""What backend `llmapi` (TensorRT-LLM's PyTorch backend) can run: formats, devices, KV cache.

The PyTorch backend loads the Hugging Face checkpoint as it is - block-FP8 weights with
their `weight_scale_inv` (DeepGEMM / CUTLASS block-scale GEMMs; on SM100 the scales are
turned into UE8M0 powers of two, `examples/models/core/deepseek_v3/README.md`) - so the
build never rewrites the weights into another format: `weights:` states what the
checkpoint holds (fp8_block), or fp8_ue8m0 on Blackwell to have the build requantise the
block scales itself and report the error. KV cache: fp8 or the model's bf16
(KvCacheConfig.dtype 'fp8' / 'auto'). It needs NVIDIA GPUs (Hopper or Blackwell for
block FP8).
"""

from __future__ import annotations

from kimi_trt.config import LINEAR_CLASSES, BuildConfig, ModelConfig

LLMAPI_KV_DTYPES = ("fp8", "bf16")


def _format_problems(build: BuildConfig, model: ModelConfig) -> list[str]:
    fmts = {build.weights.for_class(c) for c in LINEAR_CLASSES}
    if not model.is_fp8:
        if fmts != {"bf16"}:
            return [
                "weights: this checkpoint is bf16 (no quantization_config) and backend llmapi "
                "loads it as it is; set every linear class to bf16"
            ]
        return []
    if fmts == {"fp8_block"} or fmts == {"fp8_ue8m0"}:
        return []
    return [
        f"weights: {', '.join(sorted(fmts))} - backend llmapi loads the block-FP8 checkpoint "
        "as it is (TensorRT-LLM's PyTorch backend runs block-scaled FP8 GEMMs itself); set every "
        "linear class to fp8_block, or to fp8_ue8m0 on Blackwell to requantise the block "
        "scales at build time"
    ]


def llmapi_problems(build: BuildConfig, model: ModelConfig) -> list[str]:
    """Why backend llmapi cannot run this build (empty: it can)."""
    out: list[str] = []
    if build.gpu == "cpu":
        out.append(
            "backend llmapi runs TensorRT-LLM's PyTorch backend on NVIDIA GPUs (gpu: cpu); "
            "use backend: torch on CPU hosts"
        )
    out += _format_problems(build, model)
    if build.weights.embeddings != "bf16":
        out.append(
            f"weights.embeddings: {build.weights.embeddings} - backend llmapi keeps the "
            "checkpoint's bf16 embeddings"
        )
    if build.kv_cache_dtype not in LLMAPI_KV_DTYPES:
        out.append(
            f"kv_cache_dtype: {build.kv_cache_dtype} - backend llmapi caches fp8 or bf16 "
            "(KvCacheConfig.dtype 'fp8' or 'auto')"
        )
    return out
