"""The README demo's last step: a tool-calling chat with the tiny trained model under mpirun.

    mpirun -np 2 python scripts/demo_chat.py --engine-dir out/demo/engine-tiny-ep2 \
        "What's the weather like in Paris?" "Convert 120 USD to EUR"

Every rank loads its own rank file; rank 0 renders each question with Kimi's chat template
and the demo tools, generates greedily, parses the Kimi tool-call section into an OpenAI
`tool_calls` entry, runs the (deterministic) tool, sends its result back as a tool turn and
generates the final answer - the same round trip an OpenAI client makes through
`kimi-trt serve`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kimi_trt.chat.tool_parser import parse_tool_call_ids
from kimi_trt.runtime.engine import load_engine
from kimi_trt.runtime.failure import run_this_rank
from kimi_trt.runtime.sampling import SamplingParams
from kimi_trt.tinymodel.catalogue import TOOLS, ToolArgumentError, run_tool

DEFAULT_QUESTIONS = (
    "What's the weather like in Paris?",
    "How much is 250 USD in JPY?",
    "What is 37 * 12?",
)


def chat_round_trip(engine, question: str, params: SamplingParams) -> None:
    """One question: tool call (parsed), tool result, final answer - printed as they happen."""
    tok = engine.tokenizer
    messages: list[dict] = [{"role": "user", "content": question}]
    print(f"\nuser      > {question}")
    first = engine.generate([tok.apply_chat_template(messages, tools=TOOLS)], params)[0]
    parsed = parse_tool_call_ids(first.tokens, tok)
    if parsed.content:
        print(f"assistant > {parsed.content}")
    if not parsed.tool_calls:
        return
    messages.append(
        {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
    )
    for call in parsed.tool_calls:
        print(f"tool call > {json.dumps(call)}")
        try:
            outcome = run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
            result = outcome.content
        except ToolArgumentError as e:
            result = json.dumps({"error": str(e)})
        print(f"tool      > {result}")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    answer = engine.generate([tok.apply_chat_template(messages, tools=TOOLS)], params)[0]
    print(f"assistant > {tok.decode(answer.tokens)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--engine-dir", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("questions", nargs="*", default=list(DEFAULT_QUESTIONS))
    args = ap.parse_args(argv)

    def body() -> int:
        engine = load_engine(args.engine_dir)
        if not engine.is_driver:
            engine.worker_loop()
            return 0
        if engine.tokenizer is None:
            engine.shutdown()
            print(f"error: {args.engine_dir}: no tokenizer files (tiktoken.model)", file=sys.stderr)
            return 2
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
        for question in args.questions:
            chat_round_trip(engine, question, params)
        engine.shutdown()
        return 0

    return run_this_rank(body)


if __name__ == "__main__":
    sys.exit(main())
