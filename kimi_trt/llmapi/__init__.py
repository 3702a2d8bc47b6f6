"""Backend `llmapi`: TensorRT-LLM's PyTorch backend driven through its LLM API.

Everything here runs without tensorrt_llm: the options file the engine dir carries
(`options`), which formats, layouts and devices the backend takes (`support`), and the
checkpoint checks and optional UE8M0 requantisation done at build time (`checkpoint`).
The code that imports tensorrt_llm is `kimi_trt.runtime.llmapi_backend` (lazily).
"""
