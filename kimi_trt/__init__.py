"""kimi_trt: compiled-inference toolchain for Kimi-K2-Instruct (DeepSeek-V3 architecture)."""

__version__ = "0.1.0"
