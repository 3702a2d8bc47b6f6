"""OpenAI Chat Completions and Completions on top of `pipeline.generate_events`.

Chat prompts are rendered with the checkpoint's chat template (tools declared as Kimi
expects, also under tool_choice "none", so the prompt prefix does not change); the output
is parsed for Kimi tool calls of the declared tools, which come back as OpenAI
`tool_calls` with the ids the model wrote and finish_reason "tool_calls". tool_choice
(auto / none / required / a named function), parallel_tool_calls and response_format
(json_object / json_schema) become the request's OutputSpec, enforced while decoding
(chat/constraint.py); in "auto", calls are constrained once opened unless the server
runs with --no-constrain-tool-calls or the request sets `constrain_tool_calls: false`.
A choice whose tool call was cut by max_tokens says so in `tool_call_truncated`.
Streaming follows OpenAI's chunk format:
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

from kimi_trt.chat.constraint import ConstraintFactory, OutputSpec, tool_specs
from kimi_trt.chat.template import history_call_count
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
    constrain_tool_calls: bool = True  # the server's default for tool_choice "auto"

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def constraints(self) -> ConstraintFactory:
        return self.backend.constraints


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


def output_spec(
    state: ServerState,
    tools: list[dict[str, Any]] | None,
    tool_choice: str,
    parallel: bool | None,
    response_format: dict[str, Any] | None,
    constrain: bool | None,
    messages: list[dict[str, Any]],
) -> OutputSpec | None:
    """The request's output constraint (None: unconstrained), checked before it runs."""
    spec = OutputSpec(
        tools=tool_specs(tools),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel is not False,
        response_format=response_format,
        constrain_tool_calls=state.constrain_tool_calls if constrain is None else constrain,
        first_call_index=history_call_count(messages),
    )
    if spec.is_unconstrained:
        return None
    if not state.backend.supports_constraints:
        if spec.needs_grammar_at_start:
            param = "response_format" if response_format is not None else "tool_choice"
            raise APIError(
                400, f"{param}: {state.backend.description} cannot constrain decoding", param=param
            )
        return None  # "auto"/"none" fall back to parsing only
    try:
        state.constraints.check(spec)
    except UserError as e:
        param = str(e).split("[", 1)[0].split(":", 1)[0].split(".", 1)[0]
        raise APIError(400, str(e), param=param) from None
    return spec


def chat_request(
    state: ServerState,
    req: Any,
    prompt: list[int],
    params: SamplingParams,
    stop: list[str],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    response_format: dict[str, Any] | None,
    received: float,
) -> GenerationRequest:
    """A chat request of either API, rendered and sampled, as a GenerationRequest.

    Shared by OpenAI chat completions and Anthropic messages so that both constrain, parse
    and judge tool calls alike: the OutputSpec (checked) from the tools, tool_choice,
    parallel calls, response_format and constrain_tool_calls; tool calls parsed unless the
    output is JSON, dropped under tool_choice "none", judged against the declared schemas.
    `req` is a ChatCompletionRequest or an AnthropicMessagesRequest (both give
    tool_choice_name, parallel_tool_calls, constrain_tool_calls, skip_special_tokens);
    `messages`/`tools` are in OpenAI's form, `response_format` a format spec or None.
    """
    choice = req.tool_choice_name
    spec = output_spec(
        state,
        tools,
        choice,
        req.parallel_tool_calls,
        response_format,
        req.constrain_tool_calls,
        messages,
    )
    return GenerationRequest(
        prompt,
        params,
        stop,
        parse_tools=response_format is None,
        allow_tools=choice != "none",
        received_at=received,
        tool_schemas={t.name: t.parameters for t in tool_specs(tools)},
        output=spec,
        skip_special=req.skip_special_tokens,
    )


def build_chat(
    state: ServerState, req: ChatCompletionRequest, received: float
) -> GenerationRequest:
    check_model(state, req.model)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    prompt = chat_prompt(state, messages, tools)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(
        state, prompt, max_tokens, req.temperature, req.top_p, req.top_k, req.seed
    )
    response_format = req.response_format.spec() if req.response_format else None
    return chat_request(
        state, req, prompt, params, req.stop, messages, tools, response_format, received
    )


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
    return GenerationRequest(
        prompt, params, req.stop, False, False, received, skip_special=req.skip_special_tokens
    )


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


def _finished_choice(finish: Finish, **fields: Any) -> dict[str, Any]:
    """A chat choice that ends: with the flag for a tool call cut by max_tokens."""
    return {**_choice(finish.reason, **fields), "tool_call_truncated": finish.truncated_tool_call}


async def chat_response(state: ServerState, gen: GenerationRequest) -> dict[str, Any]:
    parsed, finish = await generate_output(state.backend, gen, state.metrics)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return {
        **_envelope(state, "chatcmpl", "chat.completion"),
        "choices": [_finished_choice(finish, message=message)],
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

    def chunk(delta: dict[str, Any]) -> str:
        return sse({**base, "choices": [_choice(None, delta=delta)]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in generate_events(state.backend, gen, state.metrics):
        if isinstance(event, ContentDelta):
            yield chunk({"content": event.text})
        elif isinstance(event, Finish):
            yield sse({**base, "choices": [_finished_choice(event, delta={})]})
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
