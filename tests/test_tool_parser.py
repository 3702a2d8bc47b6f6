"""Kimi tool-call parser: a table of outputs from the format spec and from other engines'
known failure modes; every case must give the same result streamed at every split point,
character by character and token by token as it gives parsed whole."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_trt.chat.kimi_format import (
    ARGUMENT_BEGIN as A,
)
from kimi_trt.chat.kimi_format import (
    CALL_BEGIN as B,
)
from kimi_trt.chat.kimi_format import (
    CALL_END as E,
)
from kimi_trt.chat.kimi_format import (
    SECTION_BEGIN as SB,
)
from kimi_trt.chat.kimi_format import (
    SECTION_END as SE,
)
from kimi_trt.chat.kimi_format import (
    TOOL_MARKERS,
)
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.chat.tool_parser import (
    ContentDelta,
    StreamingToolCallParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    collect,
    parse_tool_call_ids,
    parse_tool_calls,
)


def call(ident: str, args: str) -> str:
    return f"{B}{ident}{A}{args}{E}"


def section(*calls: str) -> str:
    return SB + "".join(calls) + SE


W = '{"city": "Beijing"}'
# (name, model output, expected content, expected [(id, name, arguments)], warns)
CASES = [
    ("plain content", "Hello, world!", "Hello, world!", [], False),
    ("empty output", "", "", [], False),
    (
        "spec single call",
        section(call("functions.get_weather:0", W)),
        "",
        [("functions.get_weather:0", "get_weather", W)],
        False,
    ),
    (
        "content before the section",
        "Let me check.\n" + section(call("functions.get_weather:0", W)),
        "Let me check.\n",
        [("functions.get_weather:0", "get_weather", W)],
        False,
    ),
    (
        "spec parallel calls",
        section(
            call("functions.get_weather:0", W),
            call("functions.get_weather:1", '{"city": "Shanghai"}'),
        ),
        "",
        [
            ("functions.get_weather:0", "get_weather", W),
            ("functions.get_weather:1", "get_weather", '{"city": "Shanghai"}'),
        ],
        False,
    ),
    (
        "three different functions",
        section(
            call("functions.a:0", "{}"), call("functions.b:1", "[1]"), call("functions.c:2", "3")
        ),
        "",
        [("functions.a:0", "a", "{}"), ("functions.b:1", "b", "[1]"), ("functions.c:2", "c", "3")],
        False,
    ),
    (
        "id without functions. prefix is repaired (with a warning)",
        section(call("search:2", '{"q": "x"}')),
        "",
        [("functions.search:2", "search", '{"q": "x"}')],
        True,
    ),
    (
        "id without index is not a call",
        section(call("functions.search", '{"q": "x"}')),
        'functions.search{"q": "x"}',
        [],
        True,
    ),
    (
        "bare function name, second call, is not a call",
        section(call("functions.a:0", "{}"), call("search", "{}")),
        "search{}",
        [("functions.a:0", "a", "{}")],
        True,
    ),
    (
        "a namespace stays part of the name and the id",
        section(call("functions.tools.search:1", "{}")),
        "",
        [("functions.tools.search:1", "tools.search", "{}")],
        False,
    ),
    (
        "two namespaces with the same last part stay distinct",
        section(call("functions.web.search:0", "{}"), call("functions.docs.search:1", "{}")),
        "",
        [
            ("functions.web.search:0", "web.search", "{}"),
            ("functions.docs.search:1", "docs.search", "{}"),
        ],
        False,
    ),
    (
        "functions.invalid.0 is not a function named 0",
        section(call("functions.invalid.0", "{}")),
        "functions.invalid.0{}",
        [],
        True,
    ),
    (
        "hyphen in the name, large index",
        section(call("functions.get-weather:12", "{}")),
        "",
        [("functions.get-weather:12", "get-weather", "{}")],
        False,
    ),
    (
        "nested JSON",
        section(call("functions.f:0", '{"a": {"b": [1, {"c": null}]}, "d": [[], {}]}')),
        "",
        [("functions.f:0", "f", '{"a": {"b": [1, {"c": null}]}, "d": [[], {}]}')],
        False,
    ),
    (
        "closing braces inside strings",
        section(call("functions.f:0", '{"code": "if x: {}}}", "t": "}"}')),
        "",
        [("functions.f:0", "f", '{"code": "if x: {}}}", "t": "}"}')],
        False,
    ),
    (
        "<| inside strings",
        section(call("functions.f:0", '{"q": "a <| b |> c <|tool_x"}')),
        "",
        [("functions.f:0", "f", '{"q": "a <| b |> c <|tool_x"}')],
        False,
    ),
    (
        "unicode and escapes in arguments",
        section(call("functions.f:0", '{"city": "北京", "e": "😀", "u": "\\u4f60\\n"}')),
        "",
        [("functions.f:0", "f", '{"city": "北京", "e": "😀", "u": "\\u4f60\\n"}')],
        False,
    ),
    (
        "whitespace around header and arguments",
        section(call("\n functions.f:0 \n", '\n  {"a": 1}  \n')),
        "",
        [("functions.f:0", "f", '{"a": 1}')],
        False,
    ),
    (
        "empty arguments become {}",
        section(call("functions.now:0", "  ")),
        "",
        [("functions.now:0", "now", "{}")],
        False,
    ),
    (
        "text after the section is content",
        "A" + section(call("functions.f:0", "{}")) + "B",
        "AB",
        [("functions.f:0", "f", "{}")],
        False,
    ),
    (
        "newlines between markers (pretty section)",
        f"{SB}\n{call('functions.f:0', '{}')}\n{call('functions.g:1', '{}')}\n{SE}",
        "",
        [("functions.f:0", "f", "{}"), ("functions.g:1", "g", "{}")],
        False,
    ),
    (
        "two sections in one output",
        section(call("functions.f:0", "{}")) + "mid" + section(call("functions.g:1", "{}")),
        "mid",
        [("functions.f:0", "f", "{}"), ("functions.g:1", "g", "{}")],
        False,
    ),
    (
        "content with non-marker <| |> and other special tokens",
        "a <| b |> c <|im_end|> <|tool_call_begin| d <tool_call>",
        "a <| b |> c <|im_end|> <|tool_call_begin| d <tool_call>",
        [],
        False,
    ),
    (
        "unicode content before a call",
        "好的，我来查询 😀" + section(call("functions.f:0", "{}")),
        "好的，我来查询 😀",
        [("functions.f:0", "f", "{}")],
        False,
    ),
    (
        "JSON array and string arguments are kept",
        section(call("functions.f:0", "[1, 2]"), call("functions.g:1", '"s"')),
        "",
        [("functions.f:0", "f", "[1, 2]"), ("functions.g:1", "g", '"s"')],
        False,
    ),
    (
        "truncated inside arguments",
        "ok" + SB + B + "functions.f:0" + A + '{"city": "Bei',
        "ok",
        [("functions.f:0", "f", '{"city": "Bei')],
        True,
    ),
    (
        "truncated inside the header degrades to content",
        "Hi" + SB + B + "functions.get_wea",
        "Hifunctions.get_wea",
        [],
        True,
    ),
    ("truncated right after the section marker", "Hi" + SB, "Hi", [], False),
    (
        "truncated inside a marker is literal text",
        "Hi<|tool_calls_sec",
        "Hi<|tool_calls_sec",
        [],
        False,
    ),
    (
        "missing call end before the next call",
        SB + B + "functions.f:0" + A + "{}" + call("functions.g:1", "{}") + SE,
        "",
        [("functions.f:0", "f", "{}"), ("functions.g:1", "g", "{}")],
        True,
    ),
    (
        "missing call end before the section end",
        SB + B + "functions.f:0" + A + '{"a": 1}' + SE + "after",
        "after",
        [("functions.f:0", "f", '{"a": 1}')],
        True,
    ),
    (
        "call without a section",
        "x" + call("functions.f:0", "{}") + "y",
        "xy",
        [("functions.f:0", "f", "{}")],
        True,
    ),
    (
        "header without a call-begin marker",
        SB + "functions.f:0" + A + "{}" + E + SE,
        "",
        [("functions.f:0", "f", "{}")],
        True,
    ),
    (
        "header that is not a function id degrades to content",
        section(call("get weather now", '{"a": 1}')) + "z",
        'get weather now{"a": 1}z',
        [],
        True,
    ),
    (
        "header ended by call end degrades to content",
        SB + B + "functions.f:0" + E + call("functions.g:1", "{}") + SE,
        "functions.f:0",
        [("functions.g:1", "g", "{}")],
        True,
    ),
    ("stray section end and argument marker dropped", "a" + SE + "b" + A + "c", "abc", [], True),
    (
        "invalid JSON arguments kept as written",
        section(call("functions.f:0", "{city: Beijing")),
        "",
        [("functions.f:0", "f", "{city: Beijing")],
        True,
    ),
    (
        "an integer too long for json.loads (a model can emit one) is a warning, not a crash",
        section(call("functions.f:0", '{"n": ' + "7" * 5000 + "}")),
        "",
        [("functions.f:0", "f", '{"n": ' + "7" * 5000 + "}")],
        True,
    ),
    (
        "arguments nested deeper than json.loads recurses are a warning, not a crash",
        section(call("functions.f:0", "[" * 3000 + "]" * 3000)),
        "",
        [("functions.f:0", "f", "[" * 3000 + "]" * 3000)],
        True,
    ),
    (
        "text between calls inside a section becomes content",
        SB + "thinking..." + call("functions.f:0", "{}") + SE,
        "thinking...",
        [("functions.f:0", "f", "{}")],
        True,
    ),
]

# Literal marker text inside a JSON string: only token mode (markers are ids) can tell.
LITERAL_MARKER_ARGS = json.dumps({"code": f"print('{E}{SE}')"})


def expected(case) -> tuple[str, list[dict]]:
    _, _, content, calls, _ = case
    return content, [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
    ]


def check_events(events) -> None:
    """Stream invariants: no marker text in content; start -> deltas -> end per call, in order."""
    open_calls: set[int] = set()
    next_index = 0
    for event in events:
        if isinstance(event, ContentDelta):
            assert not any(m in event.text for m in TOOL_MARKERS)
        elif isinstance(event, ToolCallStart):
            assert event.index == next_index and event.name and event.id.startswith("functions.")
            open_calls.add(event.index)
            next_index += 1
        elif isinstance(event, ToolCallArgumentsDelta):
            assert event.index in open_calls and event.text
        else:
            assert isinstance(event, ToolCallEnd)
            open_calls.remove(event.index)
    assert not open_calls


@pytest.fixture(scope="module")
def tok() -> KimiTokenizer:
    return KimiTokenizer.small()


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parse_whole(case):
    result = parse_tool_calls(case[1])
    assert (result.content, result.tool_calls) == expected(case)
    assert bool(result.warnings) == case[4], result.warnings
    for tool_call in result.tool_calls:
        assert isinstance(tool_call["function"]["arguments"], str)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streaming_every_split_point_equals_whole(case):
    text = case[1]
    whole = parse_tool_calls(text)
    for split in range(len(text) + 1):
        parser = StreamingToolCallParser()
        events = parser.feed(text[:split]) + parser.feed(text[split:]) + parser.finish()
        check_events(events)
        assert collect(events, parser.warnings) == whole, f"split at {split}"
    parser = StreamingToolCallParser()
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    check_events(events)
    assert collect(events, parser.warnings) == whole


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_token_stream_equals_text(case, tok):
    ids = tok.encode(case[1], allow_special=True)
    whole = parse_tool_calls(case[1])
    parser = StreamingToolCallParser(tok, skip_special=False)
    events = [e for i in ids for e in parser.feed_ids(i)] + parser.finish()
    check_events(events)
    streamed = collect(events)
    assert (streamed.content, streamed.tool_calls) == (whole.content, whole.tool_calls)
    assert parse_tool_call_ids(ids, tok).tool_calls == whole.tool_calls


def test_streaming_emits_name_first_then_argument_deltas():
    text = "Sure." + section(call("functions.get_weather:0", W))
    parser = StreamingToolCallParser()
    seen = []
    for ch in text:
        seen += parser.feed(ch)
    seen += parser.finish()
    kinds = [type(e).__name__ for e in seen]
    start = kinds.index("ToolCallStart")
    assert seen[start] == ToolCallStart(0, "functions.get_weather:0", "get_weather")
    assert kinds[start + 1 : -1] == ["ToolCallArgumentsDelta"] * (len(kinds) - start - 2)
    assert len(kinds) - start - 2 > 5  # arguments really stream, character by character
    assert seen[-1] == ToolCallEnd(0, True)


def test_partial_marker_is_held_back_not_leaked():
    parser = StreamingToolCallParser()
    assert parser.feed("Hello <|tool_calls_sec") == [ContentDelta("Hello ")]
    assert parser.feed("tion_begin|>") == []
    assert parser.feed(f"{B}functions.f:0{A}") == [ToolCallStart(0, "functions.f:0", "f")]


def test_token_mode_keeps_literal_marker_text_inside_arguments(tok):
    ids = (
        tok.encode("Running it.", allow_special=False)
        + [tok.special_ids[SB], tok.special_ids[B]]
        + tok.encode("functions.run:0", allow_special=False)
        + [tok.special_ids[A]]
        + tok.encode(LITERAL_MARKER_ARGS, allow_special=False)
        + [tok.special_ids[E], tok.special_ids[SE]]
    )
    result = parse_tool_call_ids(ids, tok)
    assert result.content == "Running it."
    assert result.tool_calls[0]["function"]["arguments"] == LITERAL_MARKER_ARGS
    assert not result.warnings


def test_token_mode_leaves_special_tokens_out_of_content(tok):
    """Reserved ids and turn markers the model writes are not text (skip_special=False keeps them)."""
    ids = tok.encode("Hi<|im_user|> there<|reserved_token_1100|>!", allow_special=True)
    assert tok.special_ids["<|im_user|>"] in ids
    assert parse_tool_call_ids(ids, tok).content == "Hi there!"
    parser = StreamingToolCallParser(tok, skip_special=False)
    parser.feed_ids(ids)
    parser.finish()
    assert parser.result().content == "Hi<|im_user|> there<|reserved_token_1100|>!"


def test_declared_names_decide_what_is_a_call(tok):
    text = section(call("functions.web.search:0", '{"q": "a"}'), call("functions.rm:1", "{}"))
    result = parse_tool_calls(text, tool_names=["web.search", "docs.search"])
    assert [c["id"] for c in result.tool_calls] == ["functions.web.search:0"]
    assert result.content == "functions.rm:1{}"
    assert any("not a declared function" in w for w in result.warnings)
    assert parse_tool_call_ids(tok.encode(text), tok, []).tool_calls == []


def test_call_end_reports_repairs():
    parser = StreamingToolCallParser()
    events = parser.feed(section(call("search:3", "{}"), call("functions.f:4", "{}")))
    ends = [e for e in events + parser.finish() if isinstance(e, ToolCallEnd)]
    assert ends == [ToolCallEnd(0, True, True), ToolCallEnd(1, True, False)]


def test_feed_after_finish_is_an_error():
    parser = StreamingToolCallParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


_json_text = st.text(
    alphabet=st.sampled_from(list('ab }{"\\<|>:,[]\n\t') + ["北", "😀", "é"]), max_size=12
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _json_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_json_text, children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    args=st.lists(
        st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), _json),
        min_size=1,
        max_size=3,
    ),
    ascii_only=st.booleans(),
    content=_json_text,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_random_argument_json_round_trips(args, ascii_only, content, cuts, tok):
    dumped = [json.dumps(obj, ensure_ascii=ascii_only) for _, obj in args]
    calls = [
        call(f"functions.{name}:{i}", text)
        for i, ((name, _), text) in enumerate(zip(args, dumped, strict=True))
    ]
    text = content + section(*calls)
    parser = StreamingToolCallParser()
    events = []
    start = 0
    for cut in sorted(cuts):
        events += parser.feed(text[start:cut])
        start = max(start, cut)
    events += parser.feed(text[start:]) + parser.finish()
    result = collect(events, parser.warnings)
    assert result == parse_tool_calls(text)
    assert result.content == content
    assert [c["function"]["name"] for c in result.tool_calls] == [name for name, _ in args]
    for (_, obj), tool_call in zip(args, result.tool_calls, strict=True):
        assert json.loads(tool_call["function"]["arguments"]) == obj
    assert parse_tool_call_ids(tok.encode(text), tok).tool_calls == result.tool_calls
