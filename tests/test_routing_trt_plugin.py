"""TensorRT plugin kimi_trt::noaux_tc_router: an engine built with it routes like the reference.

Needs TensorRT (>= 10.9, tensorrt.plugin) and a GPU; neither exists on CI machines, so the
engine tests skip with the reason. What runs everywhere: without TensorRT, using the
plugin is a MissingCapability (exit code 3) that says what is missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kimi_trt.errors import MissingCapability
from kimi_trt.plugins import trt_plugin
from kimi_trt.plugins.routing import RouterParams, route_noaux_tc

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_ENGINE = "TensorRT engine tests need the tensorrt package and a CUDA GPU"


@pytest.mark.skipif(
    HAVE_TRT, reason="tensorrt is installed: the missing-capability path cannot run"
)
def test_without_tensorrt_the_plugin_is_a_missing_capability():
    with pytest.raises(MissingCapability, match="noaux_tc_router needs TensorRT"):
        trt_plugin.register_noaux_tc_router()
    assert MissingCapability.exit_code == 3


def _build_engine(trt, num_experts: int, params: RouterParams, dtype, aot: bool):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    logits = network.add_input("logits", dtype, (-1, num_experts))
    bias = network.add_input("bias", trt.DataType.FLOAT, (num_experts,))
    ids, scales = trt_plugin.add_noaux_tc_router(network, logits, bias, params, aot=aot)
    ids.name, scales.name = "ids", "scales"
    network.mark_output(ids)
    network.mark_output(scales)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("logits", (1, num_experts), (64, num_experts), (512, num_experts))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "engine build failed (see TensorRT log)"
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()), reason=NO_ENGINE)
@pytest.mark.parametrize("aot", [True, False])
@pytest.mark.parametrize(
    "num_experts,params,torch_dtype",
    [
        (384, RouterParams(8, 1, 1, 2.827, True), torch.bfloat16),  # Kimi-K2
        (256, RouterParams(8, 8, 4, 2.5, True), torch.float32),  # DeepSeek-V3
    ],
)
def test_engine_matches_reference(aot, num_experts, params, torch_dtype):
    import tensorrt as trt

    trt_dtype = trt.DataType.BF16 if torch_dtype == torch.bfloat16 else trt.DataType.FLOAT
    engine = _build_engine(trt, num_experts, params, trt_dtype, aot)
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (1, 7, 128, 512):
        logits = torch.randn(tokens, num_experts, device="cuda", generator=gen).to(torch_dtype)
        bias = torch.randn(num_experts, device="cuda", generator=gen) * 0.05
        ids = torch.empty(tokens, params.top_k, dtype=torch.int32, device="cuda")
        scales = torch.empty(tokens, params.top_k, dtype=torch.float32, device="cuda")
        context.set_input_shape("logits", (tokens, num_experts))
        for name, tensor in (("logits", logits), ("bias", bias), ("ids", ids), ("scales", scales)):
            context.set_tensor_address(name, tensor.data_ptr())
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        want_ids, want_scales = route_noaux_tc(logits, bias, **params.kwargs())
        assert torch.equal(ids, want_ids), f"T={tokens}: ids differ"
        torch.testing.assert_close(scales, want_scales, rtol=0, atol=1e-6)
