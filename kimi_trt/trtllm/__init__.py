"""The TensorRT-LLM side of kimi_trt: network definition, weight adaptation, engine compile.

Only `model.py` and `compile.py` import `tensorrt_llm` (and only when called: nothing in
this package imports it at package import time). `support.py` (which weight formats and
layouts TensorRT-LLM's plugins accept) and `weights.py` (per-rank checkpoint tensors ->
the layouts TensorRT-LLM's layers declare) are plain Python/torch, tested on CPU.
"""
