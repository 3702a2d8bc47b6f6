"""GPU: the torch executor on CUDA (world 1) against transformers on CPU, same weights.

Skipped without CUDA (reason printed by pytest -ra). float32 on the GPU must match the
CPU reference like the CPU executor does (TF32 off); bfloat16 (the GPU default) within
bf16 rounding, with the routing running through the Triton kernel (`plugins.router.route`
dispatches CUDA tensors there).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the torch executor's GPU path needs one", allow_module_level=True)

from kimi_trt.runtime.engine import load_engine  # noqa: E402
from kimi_trt.runtime.sampling import SamplingParams  # noqa: E402
from kimi_trt.testing.hf_reference import load_reference_model  # noqa: E402
from tests.runtime_support import PROMPTS, converted, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tiny_ckpt, tmp_path_factory):
    return converted(tiny_ckpt, tmp_path_factory.getbasetemp() / "runtime", "w1")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_executor_matches_transformers(engine_dir, tiny_ckpt, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = load_engine(engine_dir, dtype=dtype)
    assert engine._executor.device.type == "cuda"
    ref = load_reference_model(tiny_ckpt)
    for prompt, logits in zip(PROMPTS, engine.score(PROMPTS), strict=True):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert rel_err(logits, want) <= tol
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_token_ids=()))
    assert all(len(r.tokens) == 8 for r in out)
