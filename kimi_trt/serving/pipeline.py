"""One request's generation as a stream of API-neutral events.

`generate_events` submits prompt ids to a backend and turns the token stream into
events the OpenAI and Anthropic layers render: `ContentDelta`, the tool-call events of
`tool_parser` (parsed from token ids, so marker text never leaks into content), and a
final `Finish`. It applies stop strings to the content (held back while a stop string
may be starting, the text before it kept), records the latency metrics, and cancels the
backend request when it ends early - a stop string, or the consumer going away (client
disconnect) - so the runtime frees the request's slot.

Finish reasons: "stop" (stop token or stop string), "length", "tool_calls" (the model
stopped after calling tools), "cancelled" (the backend ended it). `Finish.truncated_tool_call`
says a call was still open when the output ended (max_tokens): its arguments are partial.

A request may carry an `OutputSpec` (chat/constraint.py) that the backend turns into a
token constraint; every call is judged as it ends (`ToolCallOutcomes`): valid, repaired
(the parser mended its form), invalid (undeclared function, arguments not JSON or not
valid against the tool's schema) or truncated, and counted in the metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kimi_trt.chat.constraint import OutputSpec
from kimi_trt.chat.tool_parser import (
    ContentDelta,
    ParsedOutput,
    StreamingToolCallParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallEvent,
    ToolCallStart,
    collect,
)
from kimi_trt.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Finish:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_string: str | None = None
    truncated_tool_call: bool = False


Event = ToolCallEvent | Finish


class StopStringMatcher:
    """Cuts streamed text at the first stop string; holds back a possible stop-string start."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; after a match, `matched` is set and the rest dropped."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) != -1]
        if hits:
            pos, stop = min(hits)
            self.matched = stop
            out, self._pending = self._pending[:pos], ""
            return out
        hold = max((_overlap(self._pending, s) for s in self.stops), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.matched else self._pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


@dataclass
class GenerationRequest:
    """tool_schemas: the declared tools' parameter schemas by name (chat); the parser takes
    only calls of these. output: the constraint (None: unconstrained)."""

    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    parse_tools: bool = True  # chat: parse Kimi tool calls; completions: raw text
    allow_tools: bool = True  # False (tool_choice "none"): tool-call output is dropped
    received_at: float = 0.0
    tool_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: OutputSpec | None = None
    skip_special: bool = True  # special tokens (other than parsed markers) are not text


class ToolCallOutcomes:
    """Judges each call as it ends: valid, repaired, invalid or truncated (see module doc)."""

    def __init__(self, tool_schemas: dict[str, dict[str, Any]]):
        self.schemas = tool_schemas
        self.calls: dict[int, list[str]] = {}  # index -> [name, arguments]
        self.outcomes: list[str] = []

    def see(self, event: ToolCallEvent) -> None:
        if isinstance(event, ToolCallStart):
            self.calls[event.index] = [event.name, ""]
        elif isinstance(event, ToolCallArgumentsDelta):
            self.calls[event.index][1] += event.text
        elif isinstance(event, ToolCallEnd):
            name, arguments = self.calls[event.index]
            self.outcomes.append(self._judge(name, arguments, event))

    def _judge(self, name: str, arguments: str, end: ToolCallEnd) -> str:
        if not end.complete:
            return "truncated"
        if not valid_arguments(arguments, self.schemas.get(name)):
            return "invalid"
        return "repaired" if end.repaired else "valid"

    @property
    def truncated(self) -> bool:
        return "truncated" in self.outcomes


def valid_arguments(arguments: str, schema: dict[str, Any] | None) -> bool:
    """True when `arguments` is a JSON object valid against `schema` (if one is given)."""
    from jsonschema import Draft202012Validator

    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return False
    if not isinstance(value, dict):
        return False
    return schema is None or Draft202012Validator(schema).is_valid(value)


class PlainText:
    """The parser interface for raw completions: every token is text (markers included)."""

    def __init__(self, tokenizer, skip_special: bool = True):
        self.detok = tokenizer.detokenizer(skip_special=skip_special)
        self.rejected_headers = 0

    def feed_ids(self, token: int) -> list[ToolCallEvent]:
        text = self.detok.feed(token)
        return [ContentDelta(text)] if text else []

    def finish(self) -> list[ToolCallEvent]:
        text = self.detok.flush()
        return [ContentDelta(text)] if text else []


def _parser(request: GenerationRequest, tokenizer):
    if not request.parse_tools:
        return PlainText(tokenizer, request.skip_special)
    return StreamingToolCallParser(tokenizer, request.tool_schemas, request.skip_special)


async def generate_events(backend, request: GenerationRequest, metrics) -> AsyncIterator[Event]:
    """Run `request` on `backend`; yields content/tool-call events, then one Finish."""
    stream = backend.submit(request.prompt, request.params, request.output)
    parser = _parser(request, backend.tokenizer)
    outcomes = ToolCallOutcomes(request.tool_schemas)
    matcher = StopStringMatcher(request.stop)
    timer = metrics.request_timer(request.received_at or time.monotonic())
    called_tools = finished = False
    try:
        async for token in stream:
            timer.token()
            for event in _filter(parser.feed_ids(token), matcher, request.allow_tools):
                called_tools |= isinstance(event, ToolCallStart)
                outcomes.see(event)
                yield event
            if matcher.matched is not None:
                stream.cancel()
                break
        if matcher.matched is None:
            for event in _filter(parser.finish(), matcher, request.allow_tools):
                called_tools |= isinstance(event, ToolCallStart)
                outcomes.see(event)
                yield event
        tail = matcher.flush()
        if tail:
            yield ContentDelta(tail)
        reason = "stop" if matcher.matched is not None else (stream.finish_reason or "stop")
        if called_tools and reason == "stop":
            reason = "tool_calls"
        finished = True
        metrics.finished(timer, len(request.prompt), stream.generated, reason)
        metrics.tool_calls(outcomes.outcomes, parser.rejected_headers)
        yield Finish(
            reason, len(request.prompt), stream.generated, matcher.matched, outcomes.truncated
        )
    finally:
        if not finished:  # consumer gone (client disconnect) or an error: free the slot
            stream.cancel()
            metrics.finished(timer, len(request.prompt), stream.generated, "cancelled")


async def generate_output(
    backend, request: GenerationRequest, metrics
) -> tuple[ParsedOutput, Finish]:
    """Run `request` to its end for a non-streaming response: the assembled output + Finish."""
    events, finish = [], None
    async for event in generate_events(backend, request, metrics):
        if isinstance(event, Finish):
            finish = event
        else:
            events.append(event)
    return collect(events), finish


def _filter(events: list[ToolCallEvent], matcher: StopStringMatcher, allow_tools: bool):
    for event in events:
        if isinstance(event, ContentDelta):
            text = matcher.feed(event.text)
            if text:
                yield ContentDelta(text)
        elif allow_tools and matcher.matched is None:
            yield event
