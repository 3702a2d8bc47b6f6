"""Regenerate the references `kimi-trt verify` ships (kimi_trt/assets/verify/tiny-kimi.*).

transformers' DeepseekV3ForCausalLM (fp32, CPU) on the shipped tiny model's dequantised
weights (hf_reference.load_reference_model, an implementation independent of ours) runs
greedy decoding from fixed prompts; for every generated step we keep the token, the full
fp32 logits row that chose it and its top-1/top-2 margin (tensors `{i}.prompt`,
`{i}.tokens`, `{i}.logits`, `{i}.margins` in the .safetensors; provenance in the .json). tests/test_verify.py regenerates
them and compares with the shipped files, so they cannot go stale.

    .venv/bin/python -m kimi_trt.testing.verify_reference   # rewrites the assets
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.config import load_model_config
from kimi_trt.testing.hf_reference import load_reference_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY = ASSETS / "tiny-kimi"
STEPS = 12
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def reference_prompts(tokenizer: KimiTokenizer) -> list[list[int]]:
    """The fixed prompts: a tool call, a plain chat turn, raw text."""
    weather = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    hello = [{"role": "user", "content": "Hello! Who are you?"}]
    return [
        tokenizer.apply_chat_template(weather, tools=[WEATHER_TOOL]),
        tokenizer.apply_chat_template(hello),
        tokenizer.encode("The capital of France is"),
    ]


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int) -> dict[str, torch.Tensor]:
    """Greedy tokens, the fp32 logits row of each step and its top-1/top-2 margin."""
    ids, rows = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
        rows.append(logits)
        ids.append(int(torch.argmax(logits)))
    logits = torch.stack(rows)
    top2 = torch.topk(logits, 2, dim=-1).values
    return {
        "tokens": torch.tensor(ids[len(prompt) :], dtype=torch.int64),
        "logits": logits.contiguous(),
        "margins": (top2[:, 0] - top2[:, 1]).contiguous(),
    }


def build_references(ckpt: Path = TINY, steps: int = STEPS) -> tuple[dict, dict[str, Any]]:
    """(tensors, metadata) as stored in assets/verify/."""
    import transformers

    model = load_reference_model(ckpt)
    prompts = reference_prompts(KimiTokenizer.from_dir(ckpt))
    tensors: dict[str, torch.Tensor] = {}
    for i, prompt in enumerate(prompts):
        tensors.update({f"{i}.{k}": v for k, v in greedy_reference(model, prompt, steps).items()})
        tensors[f"{i}.prompt"] = torch.tensor(prompt, dtype=torch.int64)
    meta = {
        "model": ckpt.name,
        "model_config_hash": load_model_config(ckpt).config_hash(),
        "reference": f"transformers {transformers.__version__} DeepseekV3ForCausalLM, fp32, CPU",
        "steps": steps,
        "prompts": len(prompts),
    }
    return tensors, meta


def write_references(out: Path = ASSETS / "verify") -> None:
    tensors, meta = build_references()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "tiny-kimi.safetensors"))
    (out / "tiny-kimi.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    write_references()
