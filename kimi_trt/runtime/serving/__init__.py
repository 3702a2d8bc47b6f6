"""Serving: request batching over the runtime, OpenAI/Anthropic-compatible HTTP API, Triton models."""
