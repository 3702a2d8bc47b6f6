"""Constrained tool calling, tool_choice and response_format checked through the official
openai and anthropic clients, streamed and not, against any `kimi-trt serve` base URL (the
in-process runtime and Triton run the same checks).

The scripted engine (serving_support) always wants to answer "Checking." + a call
get_weather({"city": "Paris"}). What a constraint changes is judged independently: the
form by the clients' own parsing, the arguments by `jsonschema`.
"""

from __future__ import annotations

import json

import anthropic
import openai
from jsonschema import Draft202012Validator

from tests.serving_support import CONTENT, MESSAGES, TOOL_NAME, TOOLS, metric

MODEL = "kimi-k2"
TIME_SCHEMA = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Time now", "parameters": TIME_SCHEMA},
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
MARKERS = ("<|tool_call", "<|im_", "<|reserved")


def chat(client: openai.OpenAI, **kw):
    """One request whole and streamed; both must agree. Returns (content, calls, finish, r)."""
    kw = {"model": MODEL, "messages": MESSAGES, "temperature": 0, **kw}
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    calls = [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
    content, streamed, finish = "", {}, None
    truncated = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = streamed.setdefault(tc.index, ["", "", ""])
                entry[0] = tc.id or entry[0]
                entry[1] += (tc.function.name or "") if tc.function else ""
                entry[2] += (tc.function.arguments or "") if tc.function else ""
            if c.finish_reason:
                finish, truncated = c.finish_reason, c.model_extra.get("tool_call_truncated")
    assert content == (choice.message.content or "")
    assert [tuple(streamed[i]) for i in sorted(streamed)] == calls
    assert finish == choice.finish_reason
    assert truncated == choice.model_extra["tool_call_truncated"]
    assert not any(m in content for m in MARKERS), content
    return choice.message.content or "", calls, choice.finish_reason, whole


def valid(arguments: str, schema: dict) -> dict:
    value = json.loads(arguments)
    Draft202012Validator(schema).validate(value)
    return value


def check_openai(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    outcome = 'kimi_trt_tool_calls_total{{outcome="{}"}}'
    before = {k: metric(base, outcome.format(k)) for k in ("valid", "invalid", "truncated")}
    _auto(client)
    _tool_choice(client)
    _ids_format_and_truncation(client)
    after = {k: metric(base, outcome.format(k)) for k in before}
    assert after["invalid"] >= before["invalid"] + 2  # the unconstrained undeclared call x2
    assert after["truncated"] >= before["truncated"] + 2
    assert after["valid"] >= before["valid"] + 10


def _auto(client: openai.OpenAI) -> None:
    # the declared call is left as the model wrote it
    content, calls, finish, _ = chat(client, tools=TOOLS)
    assert (content, finish) == (CONTENT, "tool_calls")
    assert calls == [("functions.get_weather:0", TOOL_NAME, '{"city": "Paris"}')]

    # only get_time declared: the opened call becomes get_time with schema-valid arguments
    content, calls, finish, _ = chat(client, tools=[TIME_TOOL])
    (call,) = calls
    assert call[:2] == ("functions.get_time:0", "get_time") and finish == "tool_calls"
    valid(call[2], TIME_SCHEMA)
    # ... unconstrained (per request), the undeclared call is content, not a call
    content, calls, finish, _ = chat(
        client, tools=[TIME_TOOL], extra_body={"constrain_tool_calls": False}
    )
    assert calls == [] and content.startswith(CONTENT + "functions.get_weather:0")

    # no tools declared: the section cannot open
    content, calls, _, _ = chat(client, max_tokens=12)
    assert calls == [] and content.startswith(CONTENT)


def _tool_choice(client: openai.OpenAI) -> None:
    # required / named / one call only: a call from the first token
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        content, calls, finish, _ = chat(
            client, tools=[TOOLS[0], TIME_TOOL], tool_choice=choice, parallel_tool_calls=False
        )
        assert content == "" and finish == "tool_calls" and len(calls) == 1
        schema = TIME_SCHEMA if calls[0][1] == "get_time" else TOOLS[0]["function"]["parameters"]
        valid(calls[0][2], schema)
    assert calls[0][1] == "get_time"

    # none: same prompt (declarations kept), no call
    _, _, _, auto = chat(client, tools=TOOLS)
    content, calls, finish, none = chat(client, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert calls == [] and content.startswith(CONTENT) and finish == "length"
    assert none.usage.prompt_tokens == auto.usage.prompt_tokens


def _ids_format_and_truncation(client: openai.OpenAI) -> None:
    # ids: the model's call gets the dialogue-wide counter (two calls in the history)
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
                for i, n in enumerate(("get_time", TOOL_NAME))
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    _, calls, _, _ = chat(client, messages=history, tools=[TOOLS[0], TIME_TOOL])
    assert [c[0] for c in calls] == ["functions.get_weather:2"]

    # response_format: the whole answer is JSON valid against the schema
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    content, calls, finish, _ = chat(client, tools=TOOLS, response_format=fmt)
    assert calls == [] and finish == "stop"
    valid(content, ANSWER_SCHEMA)
    content, _, _, _ = chat(client, response_format={"type": "json_object"}, max_tokens=48)
    assert content.startswith("{")

    # a call cut by max_tokens: finish_reason length and the explicit flag
    _, calls, finish, whole = chat(client, tools=TOOLS, max_tokens=12)
    assert finish == "length" and whole.choices[0].model_extra["tool_call_truncated"] is True
    assert len(calls) == 1 and not calls[0][2].endswith("}")


def _anthropic_message(client: anthropic.Anthropic, **kw):
    kw = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, **kw}
    extra = {"extra_body": {"temperature": 0}}
    whole = client.messages.create(**kw, **extra)
    with client.messages.stream(**kw, **extra) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    return whole


def check_anthropic(base: str) -> None:
    client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    tools = [
        {"name": "get_time", "description": "Time now", "input_schema": TIME_SCHEMA},
        {"name": TOOL_NAME, "input_schema": TOOLS[0]["function"]["parameters"]},
    ]
    m = _anthropic_message(client, tools=tools[:1])
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use"
    assert m.content[1].name == "get_time" and m.content[1].id == "functions.get_time:0"
    Draft202012Validator(TIME_SCHEMA).validate(m.content[1].input)

    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        m = _anthropic_message(client, tools=tools, tool_choice=choice)
        assert [b.type for b in m.content] == ["tool_use"] and m.stop_reason == "tool_use"
    assert m.content[0].name == "get_time"

    m = _anthropic_message(client, tools=tools, tool_choice={"type": "none"}, max_tokens=12)
    assert [b.type for b in m.content] == ["text"] and m.stop_reason == "max_tokens"
    assert m.content[0].text.startswith(CONTENT)

    fmt = {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}
    m = _anthropic_message(client, tools=tools, output_config=fmt)
    assert m.stop_reason == "end_turn"
    Draft202012Validator(ANSWER_SCHEMA).validate(json.loads(m.content[0].text))

    m = _anthropic_message(client, tools=tools[1:], max_tokens=12)
    assert m.stop_reason == "max_tokens" and m.model_extra["tool_use_truncated"] is True
