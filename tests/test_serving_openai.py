"""`kimi-trt serve` (in-process runtime) on 127.0.0.1, driven by the official openai and
anthropic clients and raw HTTP: chat, streaming, tool calls, completions, errors,
metrics, client disconnect. One server process for the module (scripted engine, see
serving_support)."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest

from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.serving.anthropic_api import _arguments, sampler_temperature
from tests.serving_support import (
    ARGUMENTS,
    CONTENT,
    MESSAGES,
    TOOL_NAME,
    TOOLS,
    api_server,
    metric,
    script_tokens,
    scripted_engine,
)

pytestmark = pytest.mark.serving
MODEL = "kimi-k2"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return scripted_engine(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with api_server(engine_dir, log, "--default-max-tokens", "64") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def script(engine_dir) -> list[int]:
    return script_tokens(engine_dir)


@pytest.fixture(scope="module")
def tokenizer(engine_dir):
    return KimiTokenizer.from_dir(engine_dir)


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, **kw)


def _assemble_stream(chunks) -> tuple[str, list[dict], str | None]:
    """OpenAI stream chunks -> (content, tool_calls, finish_reason), as clients assemble them."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "in-process runtime"


def test_chat_tool_call(client, script):
    r = _chat(client, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == CONTENT
    (call,) = choice.message.tool_calls
    assert call.id == f"functions.{TOOL_NAME}:0" and call.type == "function"
    assert call.function.name == TOOL_NAME
    assert json.loads(call.function.arguments) == json.loads(ARGUMENTS)
    assert r.usage.completion_tokens == len(script) and r.usage.prompt_tokens > 0


def test_streaming_equals_non_streaming(client, script):
    whole = _chat(client, tools=TOOLS).choices[0]
    stream = _chat(client, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content, calls, finish = _assemble_stream(chunks)
    assert content == whole.message.content
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        (t.id, t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]
    assert chunks[-1].usage.completion_tokens == len(script)
    # no marker text ever leaks into streamed content
    assert all("<|" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_tool_result_round_trip(client):
    first = _chat(client, tools=TOOLS).choices[0].message
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": first.content,
            "tool_calls": [t.model_dump() for t in first.tool_calls],
        },
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"  # the scripted model always calls
    assert r.usage.prompt_tokens > _chat(client, tools=TOOLS).usage.prompt_tokens


def test_tool_choice_none_and_stop_and_length(client):
    r = _chat(client, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == CONTENT and r.choices[0].finish_reason == "stop"
    r = _chat(client, tools=TOOLS, stop=["ing"])
    assert r.choices[0].message.content == "Check" and r.choices[0].finish_reason == "stop"
    r = _chat(client, tools=TOOLS, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_completions_raw_text(client, tokenizer, script):
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
    assert r.choices[0].text == tokenizer.decode(script)  # raw: markers included
    assert r.choices[0].finish_reason == "stop"
    text = client.completions.create(
        model=MODEL, prompt=tokenizer.decode(prompt), max_tokens=64, temperature=0
    )
    assert text.choices[0].text == r.choices[0].text
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=64, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_default_temperature_is_0_6(client):
    def sample(**kw):
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, seed=7, **kw)
        return r.choices[0].text

    assert sample() == sample(temperature=0.6)
    assert sample() != sample(temperature=0)


def test_concurrent_requests_match_serial(client, server):
    prompts = [f"Tell me about {w}" for w in ("cats", "dogs", "rain", "sun", "sea", "hills")]

    def one(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)

    serial = [one(p).choices[0].text for p in prompts]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0)

        async def stream(p):
            s = await aclient.completions.create(
                model=MODEL, prompt=p, max_tokens=10, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in s])

        return await asyncio.gather(*(stream(p) for p in prompts))

    assert asyncio.run(run_all()) == serial


def test_anthropic_messages(server, script):
    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    tools = [
        {
            "name": TOOL_NAME,
            "description": "Current weather of a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }
    ]
    kw = dict(model=MODEL, max_tokens=64, messages=MESSAGES, tools=tools)
    m = client.messages.create(**kw, extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[0].text == CONTENT
    assert m.content[1].name == TOOL_NAME and m.content[1].input == {"city": "Paris"}
    assert m.usage.output_tokens == len(script)
    with client.messages.stream(**kw, extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in m.content]
    assert final.stop_reason == "tool_use"
    follow = client.messages.create(
        model=MODEL,
        max_tokens=8,
        tools=tools,
        messages=MESSAGES
        + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": m.content[1].id, "content": "sunny"}
                ],
            },
        ],
        extra_body={"temperature": 0},
    )
    assert follow.usage.input_tokens > m.usage.input_tokens


def test_anthropic_temperature_is_scaled(server):
    """Moonshot's mapping: real temperature = requested x 0.6 (Anthropic's range is 0..1)."""
    assert sampler_temperature(None) == pytest.approx(0.6)
    assert sampler_temperature(0.5) == pytest.approx(0.3)
    assert sampler_temperature(0.0) == 0.0
    body = {"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "temperature": 1.5}
    r = httpx.post(server + "/v1/messages", json=body)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "messages": MESSAGES}, 404, "model"),
        ({"model": MODEL, "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ({"model": MODEL, "messages": MESSAGES, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"model": MODEL, "messages": MESSAGES, "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"model": MODEL, "messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ],
)
def test_openai_errors(server, body, status, param):
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_invalid_json_and_too_long_prompt(server, engine_dir):
    r = httpx.post(
        server + "/v1/chat/completions",
        content=b'{"model": "kimi-k2", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    limit = httpx.get(server + "/v1/models").json()["data"][0]["max_model_len"]
    for stream in (False, True):
        r = httpx.post(
            server + "/v1/completions",
            json={"model": MODEL, "prompt": [5] * (limit + 10), "stream": stream},
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_completions_echo_is_refused(server):
    body = {"model": MODEL, "prompt": "hello", "echo": True}
    r = httpx.post(server + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_anthropic_error_format(server):
    r = httpx.post(server + "/v1/messages", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    r = httpx.post(
        server + "/v1/messages", json={"model": "x", "max_tokens": 5, "messages": MESSAGES}
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_disconnect_mid_stream_cancels(server, client):
    """The runtime itself ends the request as cancelled, long before its 2000 tokens.
    Greedy from "The" the scripted model writes no stop token in 2000 tokens, so only the
    cancel can end it early (sampled, it could stop before the disconnect was seen)."""
    cancelled = 'reason="cancelled"'
    before = metric(server, "kimi_trt_backend_requests_finished_total", cancelled)
    tokens = metric(server, "kimi_trt_backend_generated_tokens_total")
    body = {"model": MODEL, "prompt": "The", "max_tokens": 2000, "stream": True}
    body["temperature"] = 0
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    for _ in range(100):
        if metric(server, "kimi_trt_backend_requests_finished_total", cancelled) > before:
            break
        time.sleep(0.1)
    assert metric(server, "kimi_trt_backend_requests_finished_total", cancelled) == before + 1
    assert metric(server, "kimi_trt_backend_generated_tokens_total") - tokens < 2000
    assert metric(server, "kimi_trt_queue_depth") == 0
    assert metric(server, "kimi_trt_requests_in_flight") == 0
    assert _chat(client, tools=TOOLS).choices[0].finish_reason == "tool_calls"


def test_metrics(server, client):
    before = metric(server, "kimi_trt_time_to_first_token_seconds_count")
    _chat(client, tools=TOOLS)
    httpx.post(server + "/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert metric(server, "kimi_trt_time_to_first_token_seconds_count") == before + 1
    assert metric(server, "kimi_trt_requests_total", 'endpoint="chat",status="200"') >= 1
    assert metric(server, "kimi_trt_requests_total", 'endpoint="chat",status="404"') >= 1
    assert metric(server, "kimi_trt_inter_token_latency_seconds_count") > 0
    assert metric(server, "kimi_trt_prompt_tokens_total") > 0
    assert metric(server, "kimi_trt_generation_tokens_total") > 0


@pytest.mark.parametrize(
    "text", ['{"city": Paris}', '{"n": ' + "7" * 5000 + "}", "[" * 3000 + "]" * 3000]
)
def test_anthropic_tool_input_keeps_arguments_json_cannot_read(text):
    """A tool_use block's input for arguments the model wrote that json.loads rejects
    (malformed, an over-long integer, nesting past its recursion limit): the raw text, not
    a 500 from the server."""
    assert _arguments(text) == {"_raw_arguments": text}
