"""Grammar-constrained Kimi output (chat/constraint.py): driven by random logits over the
small vocabulary (the model's preferences are arbitrary, the constraint must hold anyway)
and through the runtime's sampling hook with the scripted model. Outputs are judged by
independent code: the Kimi parser for the form, `jsonschema` for the arguments."""

from __future__ import annotations

import json

import pytest
import torch
from jsonschema import Draft202012Validator

from kimi_trt.chat.constraint import ConstraintFactory, OutputSpec, ToolSpec, tool_specs
from kimi_trt.chat.kimi_format import TOOL_MARKERS
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.chat.tool_parser import parse_tool_call_ids
from kimi_trt.errors import UserError
from kimi_trt.runtime.sampling import SamplingParams, constrain_logits, sample_token

WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
SEARCH = ToolSpec(
    "web.search",
    {
        "type": "object",
        "properties": {"q": {"type": "string"}, "safe": {"type": "boolean"}},
        "required": ["q", "safe"],
        "additionalProperties": False,
    },
)
DOCS = ToolSpec("docs.search", {"type": "object", "properties": {}})
TOOLS = (WEATHER, SEARCH, DOCS)
SCHEMAS = {t.name: t.parameters for t in TOOLS}


@pytest.fixture(scope="module")
def tok() -> KimiTokenizer:
    return KimiTokenizer.small()


@pytest.fixture(scope="module")
def factory(tok) -> ConstraintFactory:
    return ConstraintFactory(tok)


def run(constraint, tok, seed: int, steps: int = 160, bias: dict[int, float] | None = None):
    """Greedy decoding of random logits under `constraint` (optionally pushing some ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(tok.vocab_size + 7, generator=gen)  # model vocab padded past it
        for token_id, value in (bias or {}).items():
            logits[token_id] += value
        token = sample_token(constrain_logits(logits, constraint), SamplingParams(), None)
        out.append(token)
        constraint.accept(token)
        if token in tok.eos_token_ids:
            return out[:-1], "stop"
    return out, "length"


def check_calls(ids, tok, names=None) -> list[dict]:
    parsed = parse_tool_call_ids(ids, tok, [t.name for t in TOOLS])
    assert not parsed.warnings, (parsed.warnings, tok.decode(ids))
    for call in parsed.tool_calls:
        name = call["function"]["name"]
        assert name in (names or SCHEMAS)
        Draft202012Validator(SCHEMAS[name]).validate(json.loads(call["function"]["arguments"]))
    return parsed.tool_calls


@pytest.mark.parametrize("seed", range(6))
def test_required_gives_declared_schema_valid_calls_with_counted_ids(factory, tok, seed):
    spec = OutputSpec(tools=TOOLS, tool_choice="required", first_call_index=5)
    constraint = factory.build(spec)
    ids, reason = run(constraint, tok, seed, steps=400, bias={ord('"'): 3.0})
    assert reason == "stop" and constraint.error is None
    calls = check_calls(ids, tok)
    assert calls and [c["id"].rsplit(":", 1)[1] for c in calls] == [
        str(5 + k) for k in range(len(calls))
    ]
    assert tok.decode(ids).startswith("<|tool_calls_section_begin|>")


@pytest.mark.parametrize("seed", range(4))
def test_auto_is_free_until_the_model_opens_a_section(factory, tok, seed):
    section = tok.special_ids["<|tool_calls_section_begin|>"]
    constraint = factory.build(OutputSpec(tools=TOOLS))
    free = constraint.allowed()
    assert free[section] and not any(free[tok.special_ids[m]] for m in TOOL_MARKERS[1:])
    ids, reason = run(constraint, tok, seed, steps=400, bias={section: 4.0, ord('"'): 3.0})
    assert constraint.in_grammar and reason == "stop"
    assert check_calls(ids, tok)


def test_named_tool_and_single_call(factory, tok):
    spec = OutputSpec(tools=TOOLS, tool_choice="web.search", parallel_tool_calls=False)
    ids, reason = run(factory.build(spec), tok, 1, steps=400, bias={ord('"'): 3.0})
    (call,) = check_calls(ids, tok, names={"web.search"})
    assert call["id"].startswith("functions.web.search:") and reason == "stop"


@pytest.mark.parametrize(
    "spec",
    [OutputSpec(tools=TOOLS, tool_choice="none"), OutputSpec(tools=(), constrain_tool_calls=True)],
    ids=["tool_choice none", "no tools declared"],
)
def test_markers_are_masked_when_no_call_may_start(factory, tok, spec):
    markers = [tok.special_ids[m] for m in TOOL_MARKERS]
    constraint = factory.build(spec)
    ids, _ = run(constraint, tok, 0, steps=60, bias={m: 50.0 for m in markers})
    assert not set(ids) & set(markers) and not constraint.in_grammar


def test_unconstrained_auto_builds_nothing(factory):
    assert factory.build(OutputSpec(tools=TOOLS, constrain_tool_calls=False)) is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
                "required": ["answer", "n"],
                "additionalProperties": False,
            },
        },
    ],
)
def test_response_format_gives_json(factory, tok, response_format):
    constraint = factory.build(OutputSpec(response_format=response_format))
    ids, reason = run(constraint, tok, 3, steps=300, bias={ord('"'): 3.0, ord("}"): 2.0})
    assert reason == "stop"
    value = json.loads(tok.decode(ids))
    schema = response_format.get("schema", {"type": "object"})
    Draft202012Validator(schema).validate(value)


def test_spec_travels_as_json():
    spec = OutputSpec(
        tools=tool_specs([{"type": "function", "function": {"name": "f"}}]),
        tool_choice="required",
        first_call_index=2,
        response_format=None,
    )
    assert OutputSpec.from_json(spec.to_json()) == spec
    assert spec.tools == (ToolSpec("f", {"type": "object"}),)
    with pytest.raises(UserError, match="OutputSpec"):
        OutputSpec.from_json('{"tools": 5}')


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (OutputSpec(tools=(), tool_choice="required"), "no tools are declared"),
        (OutputSpec(tools=(WEATHER,), tool_choice="nope"), "not a declared tool"),
        (
            OutputSpec(tools=(ToolSpec("f", {"type": "object", "$ref": "#/nowhere"}),)),
            "tools[0].parameters",
        ),
        (OutputSpec(response_format={"type": "xml"}), "response_format"),
    ],
)
def test_specs_that_cannot_be_enforced_are_user_errors(factory, spec, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        factory.check(spec)


def test_runtime_applies_the_constraint_at_sampling(tmp_path, tok):
    """The scripted model wants get_weather({"city": "Paris"}); declared is only get_time
    with an enum argument: through Engine.generate the call becomes get_time, its id the
    dialogue counter, its arguments schema-valid. Unconstrained, the script is untouched."""
    from kimi_trt.runtime.engine import load_engine
    from tests.serving_support import MESSAGES, script_tokens, scripted_engine

    engine_dir = scripted_engine(tmp_path)
    engine = load_engine(engine_dir)
    engine_tok = engine.tokenizer
    time_tool = ToolSpec(
        "get_time",
        {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET"]}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    )
    prompt = engine_tok.apply_chat_template(MESSAGES)
    spec = OutputSpec(tools=(time_tool,), first_call_index=4)
    constraint = ConstraintFactory(engine_tok).build(spec)
    params = SamplingParams(max_new_tokens=64)
    plain, constrained = engine.generate([prompt, prompt], params, constraints=[None, constraint])
    assert plain.tokens == script_tokens(engine_dir)
    parsed = parse_tool_call_ids(constrained.tokens, engine_tok, ["get_time"])
    (call,) = parsed.tool_calls
    assert call["id"] == "functions.get_time:4" and parsed.content == "Checking."
    assert json.loads(call["function"]["arguments"])["tz"] in ("UTC", "CET")
    assert constrained.finish_reason == "stop"
    engine.shutdown()
