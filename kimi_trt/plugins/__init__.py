"""Expert routing for Kimi-K2 / DeepSeek-V3 ("noaux_tc"): what TensorRT-LLM lacks.

routing          semantics (module docstring), parameters, torch reference `route_noaux_tc`
routing_triton   the Triton kernel (JIT on CUDA, interpreter on CPU) and its AOT PTX compile
router           `route`: the kernel on CUDA tensors, the reference elsewhere
trt_plugin       TensorRT quickly-deployable plugin `kimi_trt::noaux_tc_router` (lazy tensorrt)

Importing this package imports nothing heavy; only torch and triton are ever needed.
"""
