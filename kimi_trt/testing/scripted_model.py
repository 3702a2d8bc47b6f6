"""Make a synthetic checkpoint greedily emit a chosen token sequence (serving tests).

Why: serving tests need a model that really runs through the runtime and really emits a
Kimi tool call, deterministically, without a trained model. We rewrite only the
embeddings and lm_head of a synthetic checkpoint: embeddings are scaled up so that the
residual stream at the last layer is dominated by the current token's embedding, and
lm_head row `script[i+1]` is set to the direction of embedding `script[i]`, so greedy
decoding after `script[i]` picks `script[i+1]`. Every other weight stays random, and
the tokens still pass through every layer of the converted per-rank checkpoint.

The script's tokens must be distinct (a token has one successor), and a prompt must end
with `script[0]`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def _file_of(ckpt: Path, tensor: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][tensor]


def script_checkpoint(ckpt: str | Path, script: list[int], scale: float = 50.0) -> None:
    """Rewrite `ckpt`'s embeddings and lm_head so greedy decoding follows `script`."""
    ckpt = Path(ckpt)
    if len(set(script)) != len(script):
        dup = sorted({t for t in script if script.count(t) > 1})
        raise ValueError(f"script tokens must be distinct; repeated: {dup}")
    files = {EMBED: _file_of(ckpt, EMBED), LM_HEAD: _file_of(ckpt, LM_HEAD)}
    tensors = {path: load_file(path) for path in set(files.values())}
    embed = tensors[files[EMBED]][EMBED]
    lm_head = tensors[files[LM_HEAD]][LM_HEAD]
    scaled = embed.float() * scale
    head = lm_head.float()
    for current, following in zip(script, script[1:], strict=False):
        direction = scaled[current] / scaled[current].norm()
        head[following] = direction
    tensors[files[EMBED]][EMBED] = scaled.to(embed.dtype)
    tensors[files[LM_HEAD]][LM_HEAD] = head.to(lm_head.dtype)
    for path, content in tensors.items():
        save_file({k: v.contiguous() for k, v in content.items()}, path, metadata={"format": "pt"})


def tool_call_script(tokenizer, content: str, name: str, arguments: str) -> list[int]:
    """Token ids of `<|im_middle|>` + content + one Kimi tool call + `<|im_end|>`."""
    text = (
        f"<|im_middle|>{content}<|tool_calls_section_begin|><|tool_call_begin|>"
        f"functions.{name}:0<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
    )
    return tokenizer.encode(text, allow_special=True)
