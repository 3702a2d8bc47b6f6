"""Chat rendering == transformers' apply_chat_template with the same Jinja template, plus
Kimi's tool-call id normalisation and the documented prompt streams."""

from __future__ import annotations

import copy
import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from kimi_trt.chat.template import (
    DEFAULT_CHAT_TEMPLATE,
    history_call_count,
    normalize_tool_call_ids,
    render_chat,
)
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.chat.tool_parser import parse_tool_calls
from kimi_trt.errors import ConfigError, UserError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather information. Call this tool when the user needs to get weather information",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "City name"}},
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "搜索网页 — returns <|snippets|> & {json}",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
USER = {
    "role": "user",
    "content": "What's the weather like in Beijing today? Use the tool to check.",
}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def weather_call(call_id: str, city: str, idx_name: str = "get_weather") -> dict:
    arguments = json.dumps({"city": city})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": idx_name, "arguments": arguments},
    }


CONVERSATIONS = {
    "user only": ([USER], None),
    "system and user": ([SYSTEM, USER], None),
    "multi-turn": ([SYSTEM, USER, {"role": "assistant", "content": "Sunny."}, USER], None),
    "named user": ([{"role": "user", "name": "alice", "content": "hi"}], None),
    "tools declared": ([USER], [WEATHER_TOOL, SEARCH_TOOL]),
    "assistant tool call, content None": (
        [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [weather_call("functions.get_weather:0", "Beijing")],
            },
        ],
        [WEATHER_TOOL],
    ),
    "content plus two calls and results": (
        [
            SYSTEM,
            USER,
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    weather_call("functions.get_weather:0", "Beijing"),
                    weather_call("functions.get_weather:1", "上海"),
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "functions.get_weather:0",
                "name": "get_weather",
                "content": '{"weather": "Sunny"}',
            },
            {
                "role": "tool",
                "tool_call_id": "functions.get_weather:1",
                "content": '{"weather": "Rain"}',
            },
            {"role": "assistant", "content": "Sunny in Beijing, rain in Shanghai."},
        ],
        [WEATHER_TOOL],
    ),
    "dict arguments": (
        [
            USER,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "functions.search:0",
                        "type": "function",
                        "function": {"name": "search", "arguments": {"q": "北京 }{ <|x|>"}},
                    }
                ],
            },
        ],
        [SEARCH_TOOL],
    ),
    "list content with text and image parts": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe "},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "this."},
                ],
            }
        ],
        None,
    ),
    "empty string and empty list content": (
        [SYSTEM, {"role": "user", "content": ""}, {"role": "assistant", "content": []}],
        None,
    ),
    "tool result with list content": (
        [
            USER,
            {
                "role": "assistant",
                "tool_calls": [weather_call("functions.get_weather:0", "Beijing")],
            },
            {
                "role": "tool",
                "tool_call_id": "functions.get_weather:0",
                "content": [{"type": "text", "text": "Sunny"}],
            },
        ],
        [WEATHER_TOOL],
    ),
}

# A template of our own that uses what transformers' environment offers beyond plain Jinja.
FEATURE_TEMPLATE = """
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if m.role == 'assistant' -%}
    {% generation %}{{ m.content | default('') }}{% endgeneration %}
  {%- else -%}
    {{ ns.n }}:{{ m.role }}:{{ m.content | tojson }}
  {%- endif %}
  {% if loop.index > 4 %}{% break %}{% endif %}
{% endfor -%}
{{ tools | tojson(indent=2, sort_keys=true) if tools is not none else 'no tools' }}
{%- if add_generation_prompt %}>>{% endif -%}
"""


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )


def transformers_render(hf, template, messages, tools, add_generation_prompt) -> str:
    hf.chat_template = template
    return hf.apply_chat_template(
        copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


@pytest.mark.parametrize(
    "template", [DEFAULT_CHAT_TEMPLATE, FEATURE_TEMPLATE], ids=["kimi-k2", "features"]
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_transformers(hf_tokenizer, template, add_generation_prompt, name):
    messages, tools = CONVERSATIONS[name]
    ours = render_chat(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        template=template,
        normalize_ids=False,
    )
    assert ours == transformers_render(
        hf_tokenizer, template, messages, tools, add_generation_prompt
    )
    normalized = render_chat(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, template=template
    )
    as_dicts = [{k: v for k, v in m.items() if v is not None} for m in messages]
    reference = transformers_render(
        hf_tokenizer, template, normalize_tool_call_ids(as_dicts), tools, add_generation_prompt
    )
    assert normalized == reference


def test_documented_prompt_stream():
    """The stage-2 prompt of the format spec (tools, a call, its result, generation prompt)."""
    messages = [
        USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [weather_call("functions.get_weather:0", "Beijing")],
        },
        {
            "role": "tool",
            "tool_call_id": "functions.get_weather:0",
            "name": "get_weather",
            "content": '{"weather": "Sunny"}',
        },
    ]
    tools_json = json.dumps([WEATHER_TOOL], separators=(",", ":"))
    expected = (
        f"<|im_system|>tool_declare<|im_middle|>{tools_json}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        f"<|im_user|>user<|im_middle|>{USER['content']}<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
        '{"weather": "Sunny"}<|im_end|><|im_assistant|>assistant<|im_middle|>'
    )
    assert render_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_history_ids_are_normalised_and_results_repointed():
    messages = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                weather_call("call_abc", "Beijing"),
                weather_call("search:7", "x", "search"),
            ],
        },
        {"role": "tool", "tool_call_id": "search:7", "content": "r2"},
        {"role": "tool", "tool_call_id": "call_abc", "content": "r1"},
        {"role": "tool", "tool_call_id": "unknown-id", "content": "r3"},
        {"role": "assistant", "tool_calls": [weather_call("call_x", "Paris")]},
        {"role": "tool", "content": "r4"},
    ]
    out = normalize_tool_call_ids([{k: v for k, v in m.items() if v is not None} for m in messages])
    assert [c["id"] for c in out[1]["tool_calls"]] == [
        "functions.get_weather:0",
        "functions.search:1",
    ]
    assert (out[2]["tool_call_id"], out[2]["name"]) == ("functions.search:1", "search")
    assert (out[3]["tool_call_id"], out[3]["name"]) == ("functions.get_weather:0", "get_weather")
    assert out[4]["tool_call_id"] == "unknown-id" and "name" not in out[4]
    # one counter over the dialogue: the second turn's call is :2, not :0 again
    assert [c["id"] for c in out[5]["tool_calls"]] == ["functions.get_weather:2"]
    assert (out[6]["tool_call_id"], out[6]["name"]) == ("functions.get_weather:2", "get_weather")
    assert history_call_count(messages) == 3
    assert messages[1]["tool_calls"][0]["id"] == "call_abc"  # the caller's messages are untouched
    text = render_chat(messages)
    assert "call_abc" not in text and "search:7" not in text
    assert "<|im_system|>search<|im_middle|>## Return of functions.search:1\nr2<|im_end|>" in text


def test_repeated_client_ids_are_matched_in_order():
    """Two turns whose clients reused `call_1`: each result goes to its own call."""
    messages = [
        USER,
        {"role": "assistant", "tool_calls": [weather_call("call_1", "Rome")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "r1"},
        {"role": "assistant", "tool_calls": [weather_call("call_1", "Oslo")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "r2"},
    ]
    out = normalize_tool_call_ids(messages)
    assert [out[2]["tool_call_id"], out[4]["tool_call_id"]] == [
        "functions.get_weather:0",
        "functions.get_weather:1",
    ]


def test_rendered_calls_parse_back():
    """What the template writes for a call is what the parser reads as that call."""
    call = {
        "id": "functions.search:0",
        "type": "function",
        "function": {"name": "search", "arguments": '{"q": "}<|"}'},
    }
    text = render_chat(
        [USER, {"role": "assistant", "content": "Hm.", "tool_calls": [call]}],
        add_generation_prompt=False,
    )
    body = text.split("<|im_assistant|>assistant<|im_middle|>")[1].removesuffix("<|im_end|>")
    parsed = parse_tool_calls(body)
    assert parsed.content == "Hm." and parsed.tool_calls == [call] and not parsed.warnings


def test_sort_tool_keys():
    text = render_chat([USER], tools=[WEATHER_TOOL], sort_tool_keys=True)
    assert '[{"function":{"description":' in text and text.index('"properties"') < text.index(
        '"required"'
    )


def test_tokenized_chat_uses_single_special_ids():
    tok = KimiTokenizer.small()
    ids = tok.apply_chat_template([USER], tools=[WEATHER_TOOL])
    text = tok.apply_chat_template([USER], tools=[WEATHER_TOOL], tokenize=False)
    assert tok.decode(ids) == text
    assert ids[:2] == [tok.special_ids["<|im_system|>"], *tok.encode("tool_declare")][:2]
    assert (
        ids[-3:]
        == [
            tok.special_ids["<|im_assistant|>"],
            *tok.encode("assistant"),
            tok.special_ids["<|im_middle|>"],
        ][-3:]
    )
    assert ids.count(tok.special_ids["<|im_end|>"]) == 3


def test_errors_are_one_line_user_errors():
    with pytest.raises(ConfigError, match="chat template line 1"):
        render_chat([USER], template="{% if %}")
    with pytest.raises(UserError, match="rejected the conversation: no tools allowed"):
        render_chat(
            [USER],
            tools=[WEATHER_TOOL],
            template="{% if tools %}{{ raise_exception('no tools allowed') }}{% endif %}",
        )
    with pytest.raises(UserError, match="at least one message"):
        render_chat([])
    with pytest.raises(UserError, match=r"messages\[1\]: expected an object with a string 'role'"):
        render_chat([USER, {"content": "x"}])
    with pytest.raises(UserError, match=r"messages\[1\].tool_calls\[0\]: expected function.name"):
        render_chat([USER, {"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}])


def test_sandbox_blocks_unsafe_attribute_access():
    with pytest.raises(UserError):
        render_chat([USER], template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
