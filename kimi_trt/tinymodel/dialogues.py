"""Tool-use dialogues for judging the tiny model, independent of what generates the tokens.

`run_dialogues(generate, ...)` plays every eval case as a real client would: render the
prompt with the checkpoint's chat template, generate greedily, parse the output with the
Kimi tool-call parser, execute the call with the deterministic tools, send the result back
and generate the final answer. `generate` is any function from prompt ids to output ids
(transformers, or our runtime under mpirun), so both are judged by identical code.
With constrained=True each prompt also carries its OutputSpec (chat/constraint.py: the
declared tools, the dialogue's call counter) and `generate(prompts, max_new, specs)` must
decode under it. `summarise` turns the per-case records into the issue's figures and
targets; a call is schema-valid when its arguments pass `jsonschema` for the declared tool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from kimi_trt.chat.constraint import OutputSpec, tool_specs
from kimi_trt.chat.template import history_call_count
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.chat.tool_parser import parse_tool_call_ids
from kimi_trt.tinymodel.catalogue import TOOL_NAMES, TOOLS, ToolArgumentError, run_tool
from kimi_trt.tinymodel.corpus import EvalCase, eval_cases

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny-kimi"
MAX_CALL_TOKENS = 48
MAX_ANSWER_TOKENS = 40
TARGETS = {
    "well_formed_sections": 0.99,
    "right_tool": 0.95,
    "exact_args_catalogue_unseen_phrasing": 0.95,
    "exact_args_heldout_values": 0.80,
    "answers_restate_result": 0.90,
}
# generate(prompts, max_new) or, constrained, generate(prompts, max_new, specs)
Generate = Callable[..., list[tuple[list[int], str]]]


def select_cases(limit: int = 0) -> list[EvalCase]:
    """All eval cases, or an evenly spread subset of at most `limit` (every split kept)."""
    cases = eval_cases()
    if not limit or limit >= len(cases):
        return cases
    step = len(cases) / limit
    return [cases[int(i * step)] for i in range(limit)]


SCHEMAS = {t.name: t.parameters for t in tool_specs(TOOLS)}


def _schema_valid(name: str | None, args: Any) -> bool:
    schema = SCHEMAS.get(name) if name is not None else None
    return schema is not None and Draft202012Validator(schema).is_valid(args)


def output_spec(messages: list[dict], tools: list[dict] | None) -> OutputSpec:
    """A request's constraint as the server builds it for tool_choice "auto"."""
    return OutputSpec(tools=tool_specs(tools), first_call_index=history_call_count(messages))


def _judge_call(case: EvalCase, ids: list[int], finish: str, tok: KimiTokenizer) -> dict:
    parsed = parse_tool_call_ids(ids, tok, [t["function"]["name"] for t in case.tools or ()])
    calls = parsed.tool_calls
    record: dict[str, Any] = {
        "split": case.split,
        "prompt": case.messages[-1]["content"],
        "output": tok.decode(ids),
        "expected_tool": case.expected_tool,
        "expected_args": case.expected_args,
        "n_calls": len(calls),
    }
    args = None
    if calls:
        try:
            args = json.loads(calls[0]["function"]["arguments"])
        except (ValueError, RecursionError):
            args = None
    record["well_formed"] = bool(
        len(calls) == 1 and not parsed.warnings and finish == "stop" and isinstance(args, dict)
    )
    record["tool"] = calls[0]["function"]["name"] if calls else None
    record["args"] = args
    record["call"] = calls[0] if calls else None
    record["schema_valid"] = record["well_formed"] and _schema_valid(record["tool"], args)
    record["right_tool"] = record["tool"] == case.expected_tool
    record["exact_args"] = record["right_tool"] and args == case.expected_args
    return record


def _answer_prompt(
    case: EvalCase, record: dict, tok: KimiTokenizer
) -> tuple[list[int], OutputSpec] | None:
    """The follow-up prompt with the executed tool's result, or None if the call can't run."""
    call = record["call"]
    if call is None or record["tool"] not in TOOL_NAMES or not isinstance(record["args"], dict):
        return None
    try:
        outcome = run_tool(record["tool"], record["args"])
    except ToolArgumentError:
        return None
    record["tool_result"] = outcome.content
    record["facts"] = list(outcome.facts)
    messages = case.messages + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": outcome.content},
    ]
    prompt = tok.apply_chat_template(messages, tools=case.tools, add_generation_prompt=True)
    return prompt, output_spec(messages, case.tools)


def run_dialogues(
    generate: Generate, checkpoint: Path, cases: list[EvalCase], constrained: bool = False
) -> list[dict]:
    """Both turns of every case; one record per case (see `summarise` for the figures)."""
    tok = KimiTokenizer.from_dir(checkpoint)

    def run(prompts: list[list[int]], specs: list[OutputSpec], max_new: int):
        return generate(prompts, max_new, specs) if constrained else generate(prompts, max_new)

    prompts = [tok.apply_chat_template(c.messages, tools=c.tools) for c in cases]
    specs = [output_spec(c.messages, c.tools) for c in cases]
    first = run(prompts, specs, MAX_CALL_TOKENS)
    records = [_judge_call(c, ids, fin, tok) for c, (ids, fin) in zip(cases, first, strict=True)]
    follow = [(r, _answer_prompt(c, r, tok)) for c, r in zip(cases, records, strict=True)]
    follow = [(r, p) for r, p in follow if p is not None]
    answers = run([p[0] for _, p in follow], [p[1] for _, p in follow], MAX_ANSWER_TOKENS)
    for (record, _), (ids, _fin) in zip(follow, answers, strict=True):
        text = tok.decode(ids)
        record["answer"] = text
        record["answer_ok"] = all(fact in text for fact in record["facts"])
    for record in records:
        record.pop("call", None)
    return records


def _rate(records: list[dict], key: str) -> dict[str, Any]:
    n = len(records)
    hits = sum(1 for r in records if r.get(key))
    return {"rate": hits / n if n else None, "hits": hits, "n": n}


def summarise(records: list[dict]) -> dict[str, Any]:
    """The issue's figures (each with hits/n), per-kind held-out rates, and pass flags."""
    tool = [r for r in records if r["expected_tool"] is not None]
    by_split = {
        s: [r for r in tool if r["split"] == s]
        for s in ("catalogue_unseen_phrasing", "heldout_values")
    }
    answered = [r for r in tool if "answer" in r]
    figures = {
        "well_formed_sections": _rate(tool, "well_formed"),
        "schema_valid_calls": _rate(tool, "schema_valid"),
        "right_tool": _rate(tool, "right_tool"),
        "exact_args_catalogue_unseen_phrasing": _rate(
            by_split["catalogue_unseen_phrasing"], "exact_args"
        ),
        "exact_args_heldout_values": _rate(by_split["heldout_values"], "exact_args"),
        "answers_restate_result": _rate(answered, "answer_ok"),
    }
    heldout_by_tool = {
        name: _rate(
            [r for r in by_split["heldout_values"] if r["expected_tool"] == name], "exact_args"
        )
        for name in TOOL_NAMES
    }
    small_talk = [r for r in records if r["expected_tool"] is None]
    no_tool = {
        "rate": None,
        "n": len(small_talk),
        "hits": sum(1 for r in small_talk if r["n_calls"] == 0),
    }
    if small_talk:
        no_tool["rate"] = no_tool["hits"] / len(small_talk)
    passed = {
        k: figures[k]["rate"] is not None and figures[k]["rate"] >= t for k, t in TARGETS.items()
    }
    calls_by_split = {
        split: {key: _rate(rs, key) for key in ("well_formed", "schema_valid", "exact_args")}
        for split, rs in by_split.items()
    }
    return {
        "figures": figures,
        "targets": TARGETS,
        "passed": passed,
        "heldout_exact_args_by_tool": heldout_by_tool,
        "calls_by_split": calls_by_split,
        "small_talk_without_tool_call": no_tool,
        "cases": len(records),
    }
