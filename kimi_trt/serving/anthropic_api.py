"""Anthropic Messages API (`POST /v1/messages`) on the same pipeline as the OpenAI endpoints.

Requests are translated to the chat form the template takes: `system` -> a system turn,
`text` blocks -> content, `tool_use` blocks -> assistant `tool_calls`, `tool_result`
blocks -> tool turns (before the user's text of that message; a result for an id no
earlier tool_use carried is a 400), `tools[].input_schema` -> function parameters (kept
in the prompt under tool_choice "none"). tool_choice any / tool / none and
`output_config.format` (json_schema) are enforced while decoding, as on the OpenAI side. Temperature is mapped as Moonshot's Anthropic-compatible API does:
the sampler's temperature = requested x 0.6 (Anthropic's range 0..1 onto Kimi's
recommended 0..0.6; no temperature -> 0.6).

Responses: content blocks `text` and `tool_use` (`input` is the parsed JSON arguments),
stop_reason end_turn / max_tokens / stop_sequence / tool_use, and `tool_use_truncated`
when a tool call was cut by max_tokens. Streaming sends
message_start, content_block_start/delta/stop per block (text_delta, input_json_delta),
message_delta (stop_reason, usage) and message_stop, as named SSE events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kimi_trt.chat.tool_parser import (
    ContentDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from kimi_trt.serving.anthropic_schemas import (
    AnthropicMessagesRequest,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from kimi_trt.serving.openai_api import (
    ServerState,
    chat_prompt,
    chat_request,
    check_model,
    sampling_params,
)
from kimi_trt.serving.pipeline import (
    Finish,
    GenerationRequest,
    generate_events,
    generate_output,
)
from kimi_trt.serving.schemas import APIError

TEMPERATURE_SCALE = 0.6
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _text_of(content: str | list[TextBlock]) -> str:
    """A plain string from a string or a list of text blocks."""
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _message_turns(i: int, message: Message, known_ids: set[str]) -> list[dict[str, Any]]:
    role, content = message.role, message.content
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    text, calls, results = [], [], []
    for j, block in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock) and role == "assistant":
            arguments = json.dumps(block.input, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
            known_ids.add(block.id)
        elif isinstance(block, ToolResultBlock) and role == "user":
            if block.tool_use_id not in known_ids:
                raise APIError(
                    400,
                    f"{where}.tool_use_id: {block.tool_use_id!r} matches no earlier tool_use block",
                    param="messages",
                )
            content = _text_of(block.content)
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        else:
            raise APIError(
                400, f"{where}: a {block.type} block cannot be in a {role} message", "messages"
            )
    if role == "assistant":
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    return results + ([{"role": "user", "content": "".join(text)}] if text else [])


def to_chat(req: AnthropicMessagesRequest) -> tuple[list[dict], list[dict] | None]:
    """Anthropic messages + tools -> OpenAI-style chat messages + tools."""
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _text_of(req.system)})
    known_ids: set[str] = set()
    for i, message in enumerate(req.messages):
        messages += _message_turns(i, message, known_ids)
    tools = None
    if req.tools:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema,
                },
            }
            for t in req.tools
        ]
    return messages, tools


def sampler_temperature(requested: float | None) -> float:
    """Moonshot's mapping of an Anthropic temperature (0..1, default 1) onto Kimi's sampler."""
    return TEMPERATURE_SCALE * (1.0 if requested is None else requested)


def build_messages(state: ServerState, req: AnthropicMessagesRequest, received: float):
    check_model(state, req.model)
    messages, tools = to_chat(req)
    prompt = chat_prompt(state, messages, tools)
    temperature = sampler_temperature(req.temperature)
    params = sampling_params(
        state, prompt, req.max_tokens, temperature, req.top_p, req.top_k, req.seed
    )
    stop = req.stop_sequences or []
    # the calls are judged against `tools`, where to_chat put each input_schema
    return chat_request(
        state, req, prompt, params, stop, messages, tools, req.response_format, received
    )


def _stop(finish: Finish) -> tuple[str, str | None]:
    if finish.stop_string is not None:
        return "stop_sequence", finish.stop_string
    return STOP_REASONS.get(finish.reason, "end_turn"), None


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):  # malformed, too many digits, or nested too deep
        return {"_raw_arguments": text}


def _message(
    state: ServerState,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    stop_sequence: str | None,
    usage: dict[str, int],
    truncated: bool = False,
) -> dict[str, Any]:
    """An assistant Message object: the whole response, or the stream's message_start."""
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
        "tool_use_truncated": truncated,
    }


async def messages_response(state: ServerState, gen: GenerationRequest) -> dict[str, Any]:
    parsed, finish = await generate_output(state.backend, gen, state.metrics)
    content: list[dict[str, Any]] = []
    if parsed.content:
        content.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        fn = call["function"]
        content.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": fn["name"],
                "input": _arguments(fn["arguments"]),
            }
        )
    stop_reason, stop_sequence = _stop(finish)
    usage = {"input_tokens": finish.prompt_tokens, "output_tokens": finish.completion_tokens}
    return _message(state, content, stop_reason, stop_sequence, usage, finish.truncated_tool_call)


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


class _Blocks:
    """Opens/closes content blocks as the stream moves between text and tool calls."""

    def __init__(self):
        self.index = -1
        self.open_kind: str | None = None

    def open(self, kind: str, block: dict[str, Any]) -> list[str]:
        out = self.close()
        self.index += 1
        self.open_kind = kind
        out.append(event("content_block_start", {"index": self.index, "content_block": block}))
        return out

    def close(self) -> list[str]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [event("content_block_stop", {"index": self.index})]


async def messages_stream(state: ServerState, gen: GenerationRequest) -> AsyncIterator[str]:
    usage = {"input_tokens": len(gen.prompt), "output_tokens": 0}
    message = _message(state, [], None, None, usage)
    yield event("message_start", {"message": message})
    blocks = _Blocks()
    async for ev in generate_events(state.backend, gen, state.metrics):
        if isinstance(ev, ContentDelta):
            if blocks.open_kind != "text":
                for line in blocks.open("text", {"type": "text", "text": ""}):
                    yield line
            delta = {"type": "text_delta", "text": ev.text}
            yield event("content_block_delta", {"index": blocks.index, "delta": delta})
        elif isinstance(ev, ToolCallStart):
            block = {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}
            for line in blocks.open("tool_use", block):
                yield line
        elif isinstance(ev, ToolCallArgumentsDelta):
            delta = {"type": "input_json_delta", "partial_json": ev.text}
            yield event("content_block_delta", {"index": blocks.index, "delta": delta})
        elif isinstance(ev, ToolCallEnd):
            for line in blocks.close():
                yield line
        elif isinstance(ev, Finish):
            for line in blocks.close():
                yield line
            stop_reason, stop_sequence = _stop(ev)
            delta = {
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "tool_use_truncated": ev.truncated_tool_call,
            }
            usage = {"output_tokens": ev.completion_tokens}
            yield event("message_delta", {"delta": delta, "usage": usage})
            yield event("message_stop", {})
