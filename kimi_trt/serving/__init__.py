"""Serving: OpenAI/Anthropic-compatible HTTP API, request batching over the runtime,
metrics, Triton model repositories, the bundled tritonserver launcher and Triton Python models.
"""
