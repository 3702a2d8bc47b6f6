"""Kimi's chat format: tokenizer, chat template, tool-call markers and parser, BPE trainer.

Pure text <-> token ids; no torch, no runtime. Serving and the tiny model build on it.
"""
