"""OpenAI Chat Completions and Completions on top of `pipeline.generate_events`.

Chat prompts are rendered with the checkpoint's chat template (tools declared as Kimi
expects); the output is parsed for Kimi tool calls, which come back as OpenAI
`tool_calls` with finish_reason "tool_calls". Streaming follows OpenAI's chunk format:
a first chunk with the role, content deltas, tool calls as `{index, id, type, function:
{name, arguments: ""}}` then argument pieces, a last chunk with the finish_reason, an
optional usage chunk (`stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kimi_trt.chat.tool_parser import (
    ContentDelta,
    ToolCallArgumentsDelta,
    ToolCallStart,
)
from kimi_trt.errors import UserError
from kimi_trt.runtime.sampling import KIMI_DEFAULT_TEMPERATURE, SamplingParams
from kimi_trt.serving.pipeline import (
    Finish,
    GenerationRequest,
    generate_events,
    generate_output,
)
from kimi_trt.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)


@dataclass
class ServerState:
    """What every endpoint needs: the backend, the tokenizer, limits and metrics."""

    backend: Any
    model_name: str
    metrics: Any
    max_seq_len: int
    default_max_tokens: int = 1024
    max_body_bytes: int = 16 * 2**20

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist (this server serves `{state.model_name}`)",
            param="model",
            code="model_not_found",
        )


def sampling_params(
    state: ServerState,
    prompt: list[int],
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
) -> SamplingParams:
    """Sampling parameters; the prompt length is checked here so the error is a clean 400."""
    limit = state.backend.max_input_len
    if len(prompt) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your "
            f"prompt has {len(prompt)} tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    room = max(state.max_seq_len - len(prompt), 1)
    params = SamplingParams(
        max_new_tokens=min(max_tokens or state.default_max_tokens, room),
        temperature=KIMI_DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=seed,
    )
    try:
        state.backend.validate(prompt, params)
    except UserError as e:
        raise APIError(400, str(e), code="invalid_prompt") from None
    return params


def chat_prompt(state: ServerState, messages, tools) -> list[int]:
    try:
        return state.tokenizer.apply_chat_template(messages, tools=tools or None)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None


def build_chat(
    state: ServerState, req: ChatCompletionRequest, received: float
) -> GenerationRequest:
    check_model(state, req.model)
    allow_tools = req.tool_choice != "none"
    prompt = chat_prompt(state, req.messages, req.tools if allow_tools else None)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(
        state, prompt, max_tokens, req.temperature, req.top_p, req.top_k, req.seed
    )
    return GenerationRequest(prompt, params, req.stop, True, allow_tools, received)


def build_completion(
    state: ServerState, req: CompletionRequest, received: float
) -> GenerationRequest:
    check_model(state, req.model)
    if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
        prompt = list(req.prompt)
    else:
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        prompt = state.tokenizer.encode(text)
    params = sampling_params(
        state, prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed
    )
    return GenerationRequest(prompt, params, req.stop, False, False, received)


def _usage(finish: Finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _envelope(state: ServerState, kind: str, obj: str) -> dict[str, Any]:
    """id, object, created, model: the head of a response, or of every chunk of one stream."""
    return {
        "id": f"{kind}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": state.model_name,
    }


def _choice(finish_reason: str | None, **fields: Any) -> dict[str, Any]:
    """The single choice (n = 1): `message`, `delta` or `text`, then its finish_reason."""
    return {"index": 0, **fields, "finish_reason": finish_reason, "logprobs": None}


async def chat_response(state: ServerState, gen: GenerationRequest) -> dict[str, Any]:
    parsed, finish = await generate_output(state.backend, gen, state.metrics)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return {
        **_envelope(state, "chatcmpl", "chat.completion"),
        "choices": [_choice(finish.reason, message=message)],
        "usage": _usage(finish),
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _tool_delta(event) -> dict[str, Any] | None:
    if isinstance(event, ToolCallStart):
        return {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
    if isinstance(event, ToolCallArgumentsDelta):
        return {"index": event.index, "function": {"arguments": event.text}}
    return None


async def chat_stream(
    state: ServerState, gen: GenerationRequest, include_usage: bool
) -> AsyncIterator[str]:
    base = _envelope(state, "chatcmpl", "chat.completion.chunk")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({**base, "choices": [_choice(finish, delta=delta)]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in generate_events(state.backend, gen, state.metrics):
        if isinstance(event, ContentDelta):
            yield chunk({"content": event.text})
        elif isinstance(event, Finish):
            yield chunk({}, event.reason)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(event)})
        elif (delta := _tool_delta(event)) is not None:
            yield chunk({"tool_calls": [delta]})
    yield sse("[DONE]")


async def completion_response(state: ServerState, gen: GenerationRequest) -> dict[str, Any]:
    # Completions do not parse tools: the output is content only.
    parsed, finish = await generate_output(state.backend, gen, state.metrics)
    return {
        **_envelope(state, "cmpl", "text_completion"),
        "choices": [_choice(finish.reason, text=parsed.content)],
        "usage": _usage(finish),
    }


async def completion_stream(
    state: ServerState, gen: GenerationRequest, include_usage: bool
) -> AsyncIterator[str]:
    base = _envelope(state, "cmpl", "text_completion")
    async for event in generate_events(state.backend, gen, state.metrics):
        if isinstance(event, ContentDelta):
            yield sse({**base, "choices": [_choice(None, text=event.text)]})
        elif isinstance(event, Finish):
            yield sse({**base, "choices": [_choice(event.reason, text="")]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(event)})
    yield sse("[DONE]")
