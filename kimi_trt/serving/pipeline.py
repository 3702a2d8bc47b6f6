"""One request's generation as a stream of API-neutral events.

`generate_events` submits prompt ids to a backend and turns the token stream into
events the OpenAI and Anthropic layers render: `ContentDelta`, the tool-call events of
`tool_parser` (parsed from token ids, so marker text never leaks into content), and a
final `Finish`. It applies stop strings to the content (held back while a stop string
may be starting, the text before it kept), records the latency metrics, and cancels the
backend request when it ends early - a stop string, or the consumer going away (client
disconnect) - so the runtime frees the request's slot.

Finish reasons: "stop" (stop token or stop string), "length", "tool_calls" (the model
stopped after calling tools), "cancelled" (the backend ended it).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kimi_trt.chat.tool_parser import (
    ContentDelta,
    ParsedOutput,
    StreamingToolCallParser,
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
    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    parse_tools: bool = True  # chat: parse Kimi tool calls; completions: raw text
    allow_tools: bool = True  # False (tool_choice "none"): tool-call output is dropped
    received_at: float = 0.0


class PlainText:
    """The parser interface for raw completions: every token is text (markers included)."""

    def __init__(self, tokenizer):
        self.detok = tokenizer.detokenizer()

    def feed_ids(self, token: int) -> list[ToolCallEvent]:
        text = self.detok.feed(token)
        return [ContentDelta(text)] if text else []

    def finish(self) -> list[ToolCallEvent]:
        text = self.detok.flush()
        return [ContentDelta(text)] if text else []


async def generate_events(backend, request: GenerationRequest, metrics) -> AsyncIterator[Event]:
    """Run `request` on `backend`; yields content/tool-call events, then one Finish."""
    stream = backend.submit(request.prompt, request.params)
    tokenizer = backend.tokenizer
    parser = StreamingToolCallParser(tokenizer) if request.parse_tools else PlainText(tokenizer)
    matcher = StopStringMatcher(request.stop)
    timer = metrics.request_timer(request.received_at or time.monotonic())
    called_tools = finished = False
    try:
        async for token in stream:
            timer.token()
            for event in _filter(parser.feed_ids(token), matcher, request.allow_tools):
                called_tools |= isinstance(event, ToolCallStart)
                yield event
            if matcher.matched is not None:
                stream.cancel()
                break
        if matcher.matched is None:
            for event in _filter(parser.finish(), matcher, request.allow_tools):
                called_tools |= isinstance(event, ToolCallStart)
                yield event
        tail = matcher.flush()
        if tail:
            yield ContentDelta(tail)
        reason = "stop" if matcher.matched is not None else (stream.finish_reason or "stop")
        if called_tools and reason == "stop":
            reason = "tool_calls"
        finished = True
        metrics.finished(timer, len(request.prompt), stream.generated, reason)
        yield Finish(reason, len(request.prompt), stream.generated, matcher.matched)
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
