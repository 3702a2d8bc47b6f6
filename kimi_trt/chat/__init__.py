"""Kimi's chat format: tokenizer, chat template, tool-call markers and parser, BPE trainer,
and the grammar constraint that keeps generated tool calls declared and schema-valid.

Text <-> token ids and token masks; no runtime, no serving. Serving and the tiny model
build on it; the runtime sees a constraint only through its `TokenConstraint` protocol.
"""
