"""Benchmark: the per-token cost of constrained tool calls (chat/constraint.py, llguidance).

For three vocabularies - the small test vocabulary (1280 ids), the tiny model's (2304) and
a Kimi-K2-sized one (163584 base tokens + 256 specials, built from the words of the Python
sources installed here: the real tiktoken.model is not available, but mask cost depends on
the number and lengths of tokens, not on which they are) - we decode a reference tool call
(two calls with string, integer, enum and nested arguments, then the stop id) token by
token and time, side by side in one run:
  grammar step    allowed() inside the section (llguidance mask + unpacking) + accept()
  free-text step  allowed() + accept() before a section opens (a cached mask)
  mask applied    constrain_logits on float32 logits of that vocabulary
  sampling        sample_token alone: greedy, and temperature 0.6 + top_p 0.9
and once per request: building llguidance's tokenizer (once per server), compiling the
grammar (cached by text afterwards) and creating a request's matcher.
Ratios: a constrained grammar step (mask + apply + accept) over one unconstrained top-p
sampling step. Results: bench/results/constraint.json. No timing assertions anywhere.

    .venv/bin/python bench/constraint.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "constraint.json"
K2_BASE = 163584
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "web.search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "filters": {
                        "type": "object",
                        "properties": {"site": {"type": "string"}, "year": {"type": "integer"}},
                    },
                },
                "required": ["query"],
            },
        },
    },
]
CALL = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "San Francisco", "days": 3, "unit": "celsius"}'
    "<|tool_call_end|><|tool_call_begin|>functions.web.search:1<|tool_call_argument_begin|>"
    '{"query": "weekend events near the bay", "filters": {"site": "sfgate.com", "year": 2026}}'
    "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
)
CONTENT = "Let me look up the forecast and some events for you."


def k2_sized_tokenizer():
    """A KimiTokenizer with Kimi-K2's vocabulary size, tokens from local Python sources."""
    import torch

    from kimi_trt.chat.tokenizer import KimiTokenizer

    words: Counter[bytes] = Counter()
    pattern = re.compile(rb" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+")
    for path in sorted(Path(torch.__file__).parents[1].rglob("*.py")):
        for word in pattern.findall(path.read_bytes()):
            words[word[:24]] += 1
        if len(words) > 3 * K2_BASE:
            break
    ranks = {bytes([b]): b for b in range(256)}
    for word, _ in words.most_common():
        if len(ranks) == K2_BASE:
            break
        ranks.setdefault(word, len(ranks))
    if len(ranks) < K2_BASE:
        raise SystemExit(f"only {len(ranks)} distinct words found; need {K2_BASE}")
    return KimiTokenizer(ranks, name="k2-sized")


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def measure(tokenizer, repeats: int) -> dict:
    import torch

    from kimi_trt.chat.constraint import ConstraintFactory, OutputSpec, section_grammar, tool_specs
    from kimi_trt.runtime.sampling import SamplingParams, constrain_logits, sample_token

    t0 = time.perf_counter()
    factory = ConstraintFactory(tokenizer)
    _ = factory.ll_tokenizer
    build_s = time.perf_counter() - t0
    spec = OutputSpec(tools=tool_specs(TOOLS), first_call_index=0)
    t0 = time.perf_counter()
    factory.compile(section_grammar(spec), "tools")
    compile_s = time.perf_counter() - t0
    content = tokenizer.encode(CONTENT, allow_special=False)
    call = tokenizer.encode(CALL, allow_special=True)
    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    greedy, top_p = SamplingParams(), SamplingParams(temperature=0.6, top_p=0.9)
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {k: [] for k in ("grammar", "free", "apply", "greedy", "top_p")}
    create: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        constraint = factory.build(spec)
        create.append(time.perf_counter() - t0)
        for token in content + call:
            in_grammar = constraint.in_grammar
            t0 = time.perf_counter()
            mask = constraint.allowed()
            t1 = time.perf_counter()
            constrain_logits(logits, constraint_of(mask))
            t2 = time.perf_counter()
            constraint.accept(token)
            t3 = time.perf_counter()
            times["grammar" if in_grammar else "free"].append((t1 - t0) + (t3 - t2))
            times["apply"].append(t2 - t1)
            assert bool(mask[token]), f"the reference call was refused at {token}"
            t0 = time.perf_counter()
            sample_token(logits, greedy, None)
            t1 = time.perf_counter()
            sample_token(logits, top_p, gen)
            times["greedy"].append(t1 - t0)
            times["top_p"].append(time.perf_counter() - t1)
        assert constraint.error is None
    per_token = {
        "grammar_step_mask_and_accept": _median_us(times["grammar"]),
        "free_text_step_mask_and_accept": _median_us(times["free"]),
        "mask_applied_to_logits": _median_us(times["apply"]),
        "sampling_greedy": _median_us(times["greedy"]),
        "sampling_temperature_top_p": _median_us(times["top_p"]),
    }
    constrained = per_token["grammar_step_mask_and_accept"] + per_token["mask_applied_to_logits"]
    return {
        "vocab_size": tokenizer.vocab_size,
        "grammar_tokens_per_call_pass": len(call),
        "llguidance_tokenizer_build_s": round(build_s, 3),
        "grammar_compile_first_s": round(compile_s, 4),
        "matcher_create_ms": round(statistics.median(create) * 1e3, 3),
        "per_token_us_median": per_token,
        "ratio_grammar_step_to_top_p_sampling": round(
            constrained / per_token["sampling_temperature_top_p"], 2
        ),
    }


class constraint_of:  # noqa: N801 - a one-line adapter with the TokenConstraint shape
    """A fixed mask as a TokenConstraint, so applying it is timed apart from computing it."""

    def __init__(self, mask):
        self.mask = mask

    def allowed(self):
        return self.mask

    def accept(self, token: int) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch

    from kimi_trt.chat.tokenizer import KimiTokenizer

    torch.set_num_threads(1)
    tiny = REPO / "kimi_trt" / "assets" / "tiny-kimi"
    vocabularies = {"small": KimiTokenizer.small(), "tiny_model": KimiTokenizer.from_dir(tiny)}
    t0 = time.perf_counter()
    vocabularies["k2_sized"] = k2_sized_tokenizer()
    k2_vocab_s = time.perf_counter() - t0
    results = {name: measure(tok, args.repeats) for name, tok in vocabularies.items()}
    import llguidance

    report = {
        "engine": f"llguidance {getattr(llguidance, '__version__', '?')}",
        "machine": f"{platform.machine()}, {platform.python_version()}, torch threads 1",
        "repeats": args.repeats,
        "k2_sized_vocab_build_s": round(k2_vocab_s, 1),
        "vocabularies": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
