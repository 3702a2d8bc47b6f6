"""`kimi-trt serve` (in-process runtime) on 127.0.0.1, driven by the official openai and
anthropic clients and raw HTTP: chat, streaming, tool calls, completions, errors,
metrics, client disconnect. One server process for the module (scripted engine, see
serving_support)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.convert.rank_checkpoint import read_rank_config
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
SEATS = 4  # --max-batch-size: requests generating at once (the concurrency tests send more)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return scripted_engine(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("logs") / "serve.log"


@pytest.fixture(scope="module")
def server(engine_dir, server_log):
    args = ("--default-max-tokens", "64", "--max-batch-size", str(SEATS))
    with api_server(engine_dir, server_log, *args) as base:
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
    r = _chat(client, tools=TOOLS, tool_choice="none", max_tokens=10)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith(CONTENT)
    r = _chat(client, tools=TOOLS, stop=["ing"])
    assert r.choices[0].message.content == "Check" and r.choices[0].finish_reason == "stop"
    r = _chat(client, tools=TOOLS, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_completions_raw_text(client, tokenizer, script):
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
    # raw: the tool markers stay (the checkpoint marks them non-special, as peers keep
    # them), the reserved special token the model wrote does not
    assert r.choices[0].text == tokenizer.decode(script, skip_special=True)
    assert r.choices[0].text.startswith(CONTENT + "<|tool_calls_section_begin|>")
    assert r.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=64,
        temperature=0,
        extra_body={"skip_special_tokens": False},
    )
    assert kept.choices[0].text == tokenizer.decode(script) != r.choices[0].text
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


TOOL = TOOLS[0]
DEEP = "[" * 10_000 + "]" * 10_000


def _raw(body: dict, **replace: str) -> bytes:
    """`body` as JSON with "@key@" placeholders (or new keys) set to raw JSON text (what
    json.dumps cannot write: lone surrogates, NaN, huge integers, deep nesting)."""
    extra = {k: f"@{k}@" for k in replace if f"@{k}@" not in json.dumps(body)}
    text = json.dumps({**body, **extra})
    for key, raw in replace.items():
        text = text.replace(f'"@{key}@"', raw)
    return text.encode()


def _tool(**function) -> dict:
    return {"type": "function", "function": {**TOOL["function"], **function}}


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


CHAT = {"model": MODEL, "messages": MESSAGES}
# (body, raw replacements, status, param): issue 21 items 2 and 3, OpenAI side
OPENAI_BAD = [
    ({**CHAT, "messages": _user(42)}, {}, 400, "messages"),
    ({**CHAT, "messages": _user([1, None, "x"])}, {}, 400, "messages"),
    ({**CHAT, "messages": _user({"a": 1})}, {}, 400, "messages"),
    ({**CHAT, "messages": _user(None)}, {}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user"}]}, {}, 400, "messages"),
    (
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {},
        400,
        "messages",
    ),
    (CHAT, {"max_tokens": "7" * 5000}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": "5"}, {}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": True}, {}, 400, "max_tokens"),
    ({**CHAT, "stream": "yes"}, {}, 400, "stream"),
    (CHAT, {"extra": DEEP}, 400, None),
    ({**CHAT, "tools": [_tool(name=None)]}, {}, 400, "tools"),
    ({**CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, {}, 400, "tools"),
    ({**CHAT, "tools": [_tool(parameters="object")]}, {}, 400, "tools"),
    ({**CHAT, "tools": [_tool(parameters={"type": "array"})]}, {}, 400, "tools"),
    ({**CHAT, "tools": [_tool(name="get weather!")]}, {}, 400, "tools"),
    ({**CHAT, "tools": [TOOL, TOOL]}, {}, 400, "tools"),
    (
        {**CHAT, "tools": [_tool(parameters="@p@")]},
        {"p": '{"type": "object", "properties": {"a": ' + "[" * 100 + "]" * 100 + "}}"},
        400,
        "tools",
    ),
    ({**CHAT, "messages": MESSAGES + [{"role": "tool", "content": "x"}]}, {}, 400, "messages"),
    ({**CHAT, "model": "@m@"}, {"m": '"\\ud800x"'}, 400, "model"),
    ({**CHAT, "temperature": "@t@"}, {"t": "NaN"}, 400, "temperature"),
    ({**CHAT, "logit_bias": {"5": 10}}, {}, 400, "logit_bias"),
    ({**CHAT, "functions": [TOOL["function"]]}, {}, 400, "functions"),
    (
        {**CHAT, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {},
        400,
        "tool_choice",
    ),
    ({**CHAT, "response_format": {"type": "xml"}}, {}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, {}, 400, "response_format"),
]


@pytest.mark.parametrize(("body", "raw", "status", "param"), OPENAI_BAD)
def test_bad_requests_are_named_4xx(server, body, raw, status, param):
    for stream in (False, True):
        data = _raw({**body, "stream": stream} if "stream" not in body else body, **raw)
        r = httpx.post(
            server + "/v1/chat/completions",
            content=data,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], err


ANTHROPIC = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES}
ANTHROPIC_BAD = [
    ({**ANTHROPIC, "messages": _user(42)}, {}, "messages"),
    ({**ANTHROPIC, "messages": _user([{"type": "image", "source": {}}])}, {}, "messages"),
    (
        {
            **ANTHROPIC,
            "messages": _user([{"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]),
        },
        {},
        "tool_use_id",
    ),
    ({**ANTHROPIC, "max_tokens": "5"}, {}, "max_tokens"),
    ({**ANTHROPIC, "stream": "yes"}, {}, "stream"),
    ({**ANTHROPIC, "model": "@m@"}, {"m": '"\\udc00"'}, "model"),
    ({**ANTHROPIC, "thinking": {"type": "enabled", "budget_tokens": 5}}, {}, "thinking"),
    ({**ANTHROPIC, "tools": [{"name": "x", "input_schema": {"type": "string"}}]}, {}, "tools"),
    ({**ANTHROPIC, "tool_choice": {"type": "any"}}, {}, "tool_choice"),
    (ANTHROPIC, {"extra": DEEP}, "nested"),
]


@pytest.mark.parametrize(("body", "raw", "needle"), ANTHROPIC_BAD)
def test_anthropic_bad_requests_are_named_400s(server, body, raw, needle):
    r = httpx.post(
        server + "/v1/messages",
        content=_raw(body, **raw),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"], err


def test_refused_requests_are_logged_in_one_line_and_the_server_still_answers(
    server, server_log, client
):
    body = _raw({**CHAT, "max_tokens": "@n@"}, n="9" * 5000)
    httpx.post(
        server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert _chat(client, tools=TOOLS).choices[0].finish_reason == "tool_calls"
    log = server_log.read_text()
    assert "Traceback" not in log
    lines = [
        line for line in log.splitlines() if "chat 400: max_tokens: an integer of 5000" in line
    ]
    assert len(lines) >= 1


LONG_PROMPT = "List numbers"  # the scripted model's greedy continuation runs 400+ tokens


def test_requests_join_a_running_generation(server, client, script):
    """Continuous batching through both clients: while a 400-token completion streams,
    an Anthropic request (not streamed) and an OpenAI chat (streamed) start and finish
    with the scripted tool call while most of the long stream is still to come (a batch
    run to its end would make them wait for all 400 tokens)."""
    anthropic_client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    long = client.completions.create(
        model=MODEL, prompt=LONG_PROMPT, max_tokens=400, temperature=0, stream=True
    )
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(c.choices[0] for c in long))
    reader.start()
    while not received:
        time.sleep(0.01)
    short_anthropic = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=MESSAGES,
        tools=[{"name": TOOL_NAME, "input_schema": TOOLS[0]["function"]["parameters"]}],
        extra_body={"temperature": 0},
    )
    short_openai = list(_chat(client, tools=TOOLS, stream=True))
    long_tokens_meanwhile = len(received)
    reader.join(120)
    assert short_anthropic.stop_reason == "tool_use"
    assert [b.name for b in short_anthropic.content if b.type == "tool_use"] == [TOOL_NAME]
    _, calls, finish = _assemble_stream(short_openai)
    assert finish == "tool_calls" and calls[0]["name"] == TOOL_NAME
    assert received[-1].finish_reason == "length" and len(received) >= 400
    assert long_tokens_meanwhile < 200


def test_a_repeated_prompt_prefix_reuses_the_kv_cache(server, client, engine_dir):
    """Two agent turns with the same system prompt and tools: the second takes the first
    one's cached blocks (prefix-cache metrics) and still answers by the script."""
    system = {"role": "system", "content": "You are a weather agent. " * 20}
    hits = metric(server, "kimi_trt_prefix_cache_hits_total")
    hit_tokens = metric(server, "kimi_trt_prefix_cache_hit_tokens_total")
    for question in ("What is the weather in Paris?", "And the weather in Paris today?"):
        messages = [system, {"role": "user", "content": question}]
        out = client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, temperature=0
        )
        assert out.choices[0].message.tool_calls[0].function.name == TOOL_NAME
    assert metric(server, "kimi_trt_prefix_cache_hits_total") >= hits + 1
    assert metric(server, "kimi_trt_prefix_cache_hit_tokens_total") >= hit_tokens + 64
    assert metric(server, "kimi_trt_requests_running") == 0
    assert metric(server, "kimi_trt_kv_cache_blocks_used") == 0
    # one max_seq_len of 32-token blocks per seat
    max_seq = read_rank_config(engine_dir).model.max_position_embeddings
    assert metric(server, "kimi_trt_kv_cache_blocks_total") == SEATS * -(-max_seq // 32)
