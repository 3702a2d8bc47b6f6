"""Chat rendering: run the checkpoint's own Jinja chat template the way transformers does.

Why not hand-format turns: a checkpoint's template is the contract its model was trained
with (and other engines' bugs came from re-implementing it: dropped generation prompts,
list content rendered as a literal list). So we execute the template itself in the same
kind of environment as transformers' `apply_chat_template`: a sandboxed, immutable Jinja
environment with trim_blocks/lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII
and accepts `separators`/`indent`/`sort_keys`, `raise_exception`, `strftime_now`, and the
`{% generation %}` block. Messages are plain data first, with None-valued keys dropped.

Before rendering, history tool-call ids are normalised to Kimi's `functions.{name}:{idx}`
(idx = one counter over the whole dialogue, as Kimi-K2 was trained: ids that restart per
turn stopped K2 from calling tools in other engines) and tool results are re-pointed;
a tool result without `name` gets its call's function name (the template prints it as
the turn's role label). The model only ever produced such ids, so clients' own ids
(`call_abc123`) would otherwise show it a format it never saw.

DEFAULT_CHAT_TEMPLATE (used when a checkpoint has none) is Kimi-K2-Instruct's documented
template: tools declared in a `tool_declare` system turn as compact JSON, the default
system prompt when the first message is not a system one, `<|im_{role}|>{name or
role}<|im_middle|>...<|im_end|>` turns, assistant tool calls in a tool-calls section,
tool results as `## Return of {id}\\n{content}`, and `<|im_assistant|>assistant<|im_middle|>`
as the generation prompt.

Special tokens come only from the template (`render_chat_parts`): message, tool-result and
tool-definition text that spells `<|im_end|><|im_system|>system<|im_middle|>` must stay
text, or a user - or a web page a tool returned - could forge a system turn or a tool
call. Rendering the template to one string and encoding it with special tokens allowed
cannot tell the two apart, so before rendering every special-token name written in the
template source is wrapped in a sentinel character that occurs nowhere in the template
or the conversation. The rendered text then splits at the sentinels into the template's
own markers and the text between them, which the tokenizer encodes with special tokens
disallowed. The conversation data is not touched, so the template's logic on it (tests,
`trim`, `tojson`) is unchanged, and without marker text in the data the tokens are
exactly those of encoding the rendered string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_trt.errors import ConfigError, UserError

DEFAULT_CHAT_TEMPLATE = (
    Path(__file__).resolve().parent.parent / "assets" / "kimi_k2_chat_template.jinja"
).read_text(encoding="utf-8")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once (cached by its text); ConfigError on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template line {e.lineno}: {e.message}") from None


def plain_data(value: Any) -> Any:
    """JSON-like copy of `value` (pydantic models via model_dump); the template sees only this."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    raise UserError(f"chat message field of type {type(value).__name__} is not JSON-like data")


def _as_messages(messages: Sequence[Any]) -> list[dict]:
    if not messages:
        raise UserError("messages: at least one message is required")
    out = []
    for i, message in enumerate(messages):
        message = plain_data(message)
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"messages[{i}]: expected an object with a string 'role'")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def normalize_tool_call_ids(messages: list[dict]) -> list[dict]:
    """Rewrite assistant tool-call ids to `functions.{name}:{N}` and re-point tool results.

    N counts the calls of the whole dialogue from 0. A client id used twice is matched to
    its calls in order. A tool result whose `tool_call_id` is unknown keeps it; one without
    an id takes the next unanswered call of the preceding assistant turn. Works on (and
    returns) copies.
    """
    id_map: dict[str, list[tuple[str, str]]] = {}
    unanswered: list[tuple[str, str]] = []
    counter = 0
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls, unanswered = [], []
            for idx, call in enumerate(message["tool_calls"]):
                name = _call_name(call, f"messages[{i}].tool_calls[{idx}]")
                new_id = f"functions.{name}:{counter}"
                counter += 1
                if isinstance(call.get("id"), str):
                    id_map.setdefault(call["id"], []).append((new_id, name))
                calls.append({**call, "id": new_id})
                unanswered.append((new_id, name))
            message["tool_calls"] = calls
        elif message["role"] == "tool":
            _point_result(message, id_map, unanswered)
        out.append(message)
    return out


def _point_result(message: dict, id_map: dict, unanswered: list[tuple[str, str]]) -> None:
    old = message.get("tool_call_id")
    targets = id_map.get(old, []) if isinstance(old, str) else []
    target = next((t for t in targets if t in unanswered), targets[0] if targets else None)
    if target is None and old is None and unanswered:
        target = unanswered[0]
    if target is not None:
        message["tool_call_id"] = target[0]
        message.setdefault("name", target[1])
        if target in unanswered:
            unanswered.remove(target)


def history_call_count(messages: Sequence[Any]) -> int:
    """Tool calls in the dialogue so far: the counter of the next call the model writes."""
    return sum(
        len(m.get("tool_calls") or [])
        for m in map(plain_data, messages)
        if isinstance(m, dict) and m.get("role") == "assistant"
    )


def _call_name(call: Any, where: str) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: expected function.name (a non-empty string)")
    return name


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _conversation(
    messages: Sequence[Any],
    tools: Sequence[Any] | None,
    normalize_ids: bool,
    sort_tool_keys: bool,
    template_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The template's variables, as plain data."""
    chat = _as_messages(messages)
    if normalize_ids:
        chat = normalize_tool_call_ids(chat)
    tool_list = plain_data(list(tools)) if tools is not None else None
    if tool_list and sort_tool_keys:
        tool_list = _sorted_keys(tool_list)
    return {"messages": chat, "tools": tool_list, "documents": None, **plain_data(template_kwargs)}


def _render(source: str, variables: dict[str, Any], add_generation_prompt: bool) -> str:
    compiled = compile_template(source)
    try:
        return compiled.render(add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template rejected the conversation: {e}") from None


def render_chat(
    messages: Sequence[Any],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    normalize_ids: bool = True,
    sort_tool_keys: bool = False,
    **template_kwargs: Any,
) -> str:
    """Render `messages` (+ `tools`) with `template` (default: Kimi-K2's) to prompt text.

    sort_tool_keys=True sorts the tools' JSON keys recursively first, as some releases of
    Kimi's tokenization_kimi.py do before rendering. Extra keyword arguments reach the
    template as variables, like transformers' `apply_chat_template(**kwargs)`.
    """
    variables = _conversation(messages, tools, normalize_ids, sort_tool_keys, template_kwargs)
    source = template if template is not None else DEFAULT_CHAT_TEMPLATE
    return _render(source, variables, add_generation_prompt)


# Sentinel candidates: the BMP's private-use area (nothing a tokenizer or template needs).
_SENTINELS = range(0xE000, 0xF900)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _free_sentinel(texts: list[str]) -> str:
    """A character that occurs in none of `texts`."""
    for code in _SENTINELS:
        char = chr(code)
        if not any(char in t for t in texts):
            return char
    raise UserError("the conversation uses every private-use character; it cannot be rendered")


@lru_cache(maxsize=8)
def _names_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def mark_specials(source: str, names: re.Pattern[str], sentinel: str) -> str:
    """`source` with every special-token name wrapped as sentinel+name+sentinel. A template
    must write its markers whole (as Kimi's do): one assembled from pieces stays text."""
    return names.sub(lambda m: f"{sentinel}{m.group(0)}{sentinel}", source)


def render_chat_parts(
    messages: Sequence[Any],
    *,
    special_names: Iterable[str],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    normalize_ids: bool = True,
    sort_tool_keys: bool = False,
    **template_kwargs: Any,
) -> list[str]:
    """Render like `render_chat`, split into [text, marker, text, ..., marker, text]: odd
    items are special-token names the template wrote, even items text (see the module
    docstring). "".join(parts) is the rendered prompt."""
    variables = _conversation(messages, tools, normalize_ids, sort_tool_keys, template_kwargs)
    source = template if template is not None else DEFAULT_CHAT_TEMPLATE
    names = _names_pattern(tuple(special_names))
    sentinel = _free_sentinel([source, *_strings(variables)])
    parts = _render(mark_specials(source, names, sentinel), variables, add_generation_prompt)
    parts = parts.split(sentinel)
    if len(parts) % 2 == 0 or not all(names.fullmatch(p) for p in parts[1::2]):
        raise ConfigError("chat template changed the text of a special token it writes")
    return parts
