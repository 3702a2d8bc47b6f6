"""Which backend can run which build: the format/GPU/backend rules of every backend in one place.

The planner (`kimi_trt.plan.make_plan`) applies these rules, and both `kimi-trt plan` and
the build's plan stage call the planner, so `plan` can never say FITS for a build that
`build` then refuses. The per-backend facts live with each backend: the engine workflow in
`kimi_trt.trtllm.support`, TensorRT-LLM's PyTorch backend in `kimi_trt.llmapi.support`;
the torch executor runs every format this package writes.
"""

from __future__ import annotations

from kimi_trt.config import LINEAR_CLASSES, BuildConfig, ModelConfig
from kimi_trt.llmapi.support import llmapi_problems
from kimi_trt.trtllm.support import BLACKWELL, trtllm_notes, trtllm_problems


def format_gpu_problems(build: BuildConfig) -> list[str]:
    """Weight formats that do not match the device, whatever the backend."""
    out = []
    for cls in LINEAR_CLASSES:
        fmt = build.weights.for_class(cls)
        if fmt == "fp8_ue8m0" and build.gpu not in (*BLACKWELL, "cpu"):
            out.append(
                f"weights.{cls}: fp8_ue8m0 (power-of-two block scales) is Blackwell's recipe; "
                f"gpu {build.gpu} runs fp8_block"
            )
    return out


def support_problems(build: BuildConfig, model: ModelConfig) -> list[str]:
    """Every backend/format/GPU combination problem of a build config (empty: it can run)."""
    out = format_gpu_problems(build)
    if build.backend == "trtllm":
        out += trtllm_problems(build)
        if model.q_lora_rank is None:
            out.append(
                "q_lora_rank: null (a direct q_proj): kimi_trt's TensorRT-LLM engine network "
                "is built for q LoRA (fused_a = q_a_proj | kv_a_proj); use backend llmapi or torch"
            )
    elif build.backend == "llmapi":
        out += llmapi_problems(build, model)
    return out


TORCH_ON_GPU = (
    "the torch executor dequantises every weight to bf16 when it loads (this plan counts them "
    "so, twice the FP8 bytes); it is the reference runtime - backend llmapi keeps block-FP8 "
    "weights resident"
)


def support_notes(build: BuildConfig, model: ModelConfig) -> list[str]:
    """Allowed but worth saying: unconfirmed upstream paths, and how weights are held."""
    if build.backend == "trtllm":
        return trtllm_notes(build, model)
    if build.backend == "torch" and build.gpu != "cpu":
        return [TORCH_ON_GPU]
    return []
