"""Kimi-K2 tool-call output -> OpenAI `tool_calls` + content, whole or streamed.

The model writes (content first, then one or more sections):

    Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
    <|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>

`StreamingToolCallParser` is fed text chunks (`feed`) or token ids (`feed_ids`, needs a
KimiTokenizer) of any size and returns events; `finish()` ends the stream. Events:

- `ContentDelta(text)`: ordinary assistant text. Never holds marker text: a chunk ending
  in what may be the start of a marker (`<|tool_ca`) is held back until it is decided.
- `ToolCallStart(index, id, name)`: a call's header is complete. `index` counts calls in
  this output from 0 (OpenAI's streaming `index`); the header must be `[functions.]name:N`
  (Kimi writes `functions.{name}:{N}`, N a dialogue-wide counter): `id` is
  `functions.{name}:{N}` as the model wrote it, and `name` everything between the prefix
  and `:N`, so namespaces stay (`functions.web.search:0` is `web.search`). Given the
  declared tool names, a header naming another function is not a call.
- `ToolCallArgumentsDelta(index, text)`: the next piece of the call's arguments string.
  Joined, the pieces are the raw text between the markers with outer whitespace removed
  (`{}` when empty). Braces, `<|` or unicode inside it are just text.
- `ToolCallEnd(index, complete, repaired)`: the call is over; complete=False when the
  stream ended before `<|tool_call_end|>` (the partial arguments stay, as OpenAI returns
  them for a length stop); repaired=True when the parser had to mend its form (no
  `functions.` prefix, a missing `<|tool_call_begin|>` or `<|tool_call_end|>`).

Bad output never raises: a header that is not `[functions.]name:N` of a declared tool, a
header cut off by the end of the stream or by another marker, or text between calls
becomes content, and stray markers are dropped; each case adds a line to
`parser.warnings` (and logs it). Arguments that are not valid JSON stay as the model wrote
them, with a warning. In token mode special tokens other than the markers (reserved ids,
turn markers) are left out of content unless skip_special=False.

OpenAI streaming mapping: ToolCallStart -> `delta.tool_calls=[{"index", "id", "type":
"function", "function": {"name", "arguments": ""}}]`; ToolCallArgumentsDelta ->
`[{"index", "function": {"arguments": text}}]`; ContentDelta -> `delta.content`.
Feed only the generated ids/text (stop tokens such as <|im_end|> removed); use one
parser per choice, and either `feed` or `feed_ids` on it, not both.

In text mode marker text is always a marker. In token mode only the markers' special ids
are markers, so arguments that contain literal marker text parse correctly.
`parse_tool_calls(text)` / `parse_tool_call_ids(ids, tok)` = feed everything + finish +
`collect`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kimi_trt.chat.kimi_format import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    SECTION_BEGIN,
    SECTION_END,
    TOOL_MARKERS,
)

if TYPE_CHECKING:
    from kimi_trt.chat.tokenizer import IncrementalDetokenizer, KimiTokenizer

log = logging.getLogger(__name__)

_HEADER = re.compile(r"(?P<prefix>functions\.)?(?P<name>[^\s:<>{}\"']+):(?P<idx>\d+)")


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    complete: bool = True
    repaired: bool = False


ToolCallEvent = ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd


@dataclass
class ParsedOutput:
    """Final result: content text, OpenAI-shaped tool_calls, warnings about bad output."""

    content: str
    tool_calls: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Marker:
    text: str


class _MarkerScanner:
    """Splits streamed text into text pieces and markers, holding back possible marker starts."""

    def __init__(self):
        self._pending = ""

    def feed(self, text: str) -> list[str | _Marker]:
        self._pending += text
        pieces: list[str | _Marker] = []
        start = 0
        pending = self._pending
        while (pos := pending.find("<|", start)) != -1:
            marker = next((m for m in TOOL_MARKERS if pending.startswith(m, pos)), None)
            if marker is None:
                if any(m.startswith(pending[pos:]) for m in TOOL_MARKERS):
                    break  # an incomplete marker at the end: wait for more text
                start = pos + 2
                continue
            pieces += [pending[:pos], _Marker(marker)]
            pending, start = pending[pos + len(marker) :], 0
        hold = _held_suffix(pending)
        pieces.append(pending[: len(pending) - hold])
        self._pending = pending[len(pending) - hold :]
        return [p for p in pieces if p]

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


def _held_suffix(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    for length in range(min(len(text), max(map(len, TOOL_MARKERS)) - 1), 0, -1):
        tail = text[-length:]
        if any(m.startswith(tail) for m in TOOL_MARKERS):
            return length
    return 0


class StreamingToolCallParser:
    """Incremental Kimi tool-call parser; see the module docstring for the event types."""

    def __init__(
        self,
        tokenizer: KimiTokenizer | None = None,
        tool_names: Iterable[str] | None = None,
        skip_special: bool = True,
    ):
        self._tokenizer = tokenizer
        self._tool_names = None if tool_names is None else frozenset(tool_names)
        self._skip_special = skip_special
        self._repaired = False  # the open call needed mending
        self.rejected_headers = 0  # call headers that were not a declared function
        self._scanner = _MarkerScanner()
        self._detok: IncrementalDetokenizer | None = None
        self._state = "content"  # content | section | header | args | skip | done
        self._buffer = ""  # section: text between calls; header: the call id text
        self._args = ""  # arguments emitted so far (for the JSON check)
        self._held_ws = ""  # trailing whitespace of the arguments, emitted only if text follows
        self._calls = 0
        self._out: list[ToolCallEvent] = []
        self.warnings: list[str] = []
        self.events: list[ToolCallEvent] = []

    # -- input -------------------------------------------------------------------------
    def feed(self, text: str) -> list[ToolCallEvent]:
        """Add generated text; return the events it completes."""
        self._check_open()
        for piece in self._scanner.feed(text):
            self._dispatch(piece)
        return self._drain()

    def feed_ids(self, ids: int | Iterable[int]) -> list[ToolCallEvent]:
        """Add generated token ids (token mode: only the markers' ids are markers)."""
        self._check_open()
        if self._tokenizer is None:
            raise ValueError("feed_ids needs StreamingToolCallParser(tokenizer=...)")
        markers = self._tokenizer.tool_marker_ids
        for token_id in (ids,) if isinstance(ids, int) else ids:
            if token_id in markers:
                self._flush_detok()
                self._on_marker(markers[token_id])
            else:
                self._detok = self._detok or self._tokenizer.detokenizer(
                    skip_special=self._skip_special
                )
                self._on_text(self._detok.feed(token_id))
        return self._drain()

    def finish(self) -> list[ToolCallEvent]:
        """End of the stream: flush held text, close or degrade an unfinished call."""
        self._check_open()
        self._flush_detok()
        self._on_text(self._scanner.flush())
        if self._state == "header":
            self._degrade_header("the output ended inside a tool-call header")
        elif self._state == "args":
            self._warn(f"tool call {self._calls - 1}: output ended before {CALL_END}")
            self._end_call(complete=False)
        elif self._state == "section":
            self._flush_section_text()
        self._state = "done"
        return self._drain()

    def result(self) -> ParsedOutput:
        """Everything parsed so far, assembled."""
        return collect(self.events, self.warnings)

    # -- state machine -----------------------------------------------------------------
    def _dispatch(self, piece: str | _Marker) -> None:
        if isinstance(piece, _Marker):
            self._on_marker(piece.text)
        else:
            self._on_text(piece)

    def _on_text(self, text: str) -> None:
        if not text:
            return
        if self._state in ("content", "skip"):
            self._emit(ContentDelta(text))
        elif self._state in ("section", "header"):
            self._buffer += text
        elif self._state == "args":
            self._args_text(text)

    def _on_marker(self, marker: str) -> None:
        handler = {
            "content": self._marker_in_content,
            "section": self._marker_in_section,
            "header": self._marker_in_header,
            "args": self._marker_in_args,
            "skip": self._marker_in_skip,
        }[self._state]
        handler(marker)

    def _marker_in_content(self, marker: str) -> None:
        if marker == SECTION_BEGIN:
            self._state, self._buffer = "section", ""
        elif marker == CALL_BEGIN:
            self._warn(f"{CALL_BEGIN} outside a tool-calls section: treated as one")
            self._state, self._buffer, self._repaired = "header", "", True
        else:
            self._warn(f"stray {marker} in content dropped")

    def _marker_in_section(self, marker: str) -> None:
        if marker == CALL_BEGIN:
            self._flush_section_text()
            self._state = "header"
        elif marker == ARGUMENT_BEGIN and self._buffer.strip():
            self._warn(f"{CALL_BEGIN} missing before a tool-call header")
            self._state, self._repaired = "header", True
            self._start_call()
        elif marker == SECTION_END:
            self._flush_section_text()
            self._state = "content"
        else:
            self._warn(f"stray {marker} inside a tool-calls section dropped")

    def _marker_in_header(self, marker: str) -> None:
        if marker == ARGUMENT_BEGIN:
            self._start_call()
        elif marker == CALL_BEGIN:
            self._degrade_header(f"tool-call header without {ARGUMENT_BEGIN}")
            self._state, self._buffer = "header", ""
        elif marker in (CALL_END, SECTION_END):
            self._degrade_header(f"tool-call header without {ARGUMENT_BEGIN}")
            self._state = "section" if marker == CALL_END else "content"
        else:
            self._warn(f"stray {marker} inside a tool-call header dropped")

    def _marker_in_args(self, marker: str) -> None:
        if marker == CALL_END:
            self._end_call(complete=True)
            self._state = "section"
        elif marker in (CALL_BEGIN, SECTION_END):
            self._warn(f"tool call {self._calls - 1}: {CALL_END} missing before {marker}")
            self._repaired = True
            self._end_call(complete=True)
            self._state = "header" if marker == CALL_BEGIN else "content"
        else:
            self._warn(f"stray {marker} inside tool-call arguments dropped")

    def _marker_in_skip(self, marker: str) -> None:
        if marker == CALL_END:
            self._state, self._buffer = "section", ""
        elif marker == SECTION_END:
            self._state = "content"
        elif marker == CALL_BEGIN:
            self._state, self._buffer = "header", ""
        else:
            self._warn(f"stray {marker} after a malformed tool call dropped")

    # -- calls -------------------------------------------------------------------------
    def _start_call(self) -> None:
        header = self._buffer.strip()
        match = _HEADER.fullmatch(header)
        name = match["name"] if match is not None else None
        if match is not None and self._tool_names is not None and name not in self._tool_names:
            if header in self._tool_names:  # a declared name that itself starts "functions."
                name = header
            else:
                match = None
        if match is None:
            self.rejected_headers += 1
            self._degrade_header(f"tool-call header {header[:80]!r} is not a declared function")
            self._state = "skip"  # its arguments are content too
            return
        if match["prefix"] is None:
            self._warn(f"tool-call header {header[:80]!r} has no functions. prefix")
            self._repaired = True
        index = self._calls
        self._calls += 1
        self._emit(ToolCallStart(index, f"functions.{name}:{match['idx']}", name))
        self._state, self._buffer, self._args, self._held_ws = "args", "", "", ""

    def _args_text(self, text: str) -> None:
        if not self._args and not self._held_ws:
            text = text.lstrip()
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if body:
            self._args += body
            self._emit(ToolCallArgumentsDelta(self._calls - 1, body))

    def _end_call(self, complete: bool) -> None:
        index = self._calls - 1
        if not self._args and complete:
            self._args = "{}"
            self._emit(ToolCallArgumentsDelta(index, "{}"))
        if complete:
            try:
                json.loads(self._args)
            except (ValueError, RecursionError) as e:  # also: too many digits, too deep
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                self._warn(f"tool call {index}: arguments are not valid JSON ({reason})")
        self._emit(ToolCallEnd(index, complete, self._repaired))
        self._buffer, self._args, self._held_ws, self._repaired = "", "", "", False

    def _degrade_header(self, reason: str) -> None:
        self._warn(f"{reason}: kept as content")
        self._repaired = False
        if self._buffer.strip():
            self._emit(ContentDelta(self._buffer))
        self._buffer = ""

    def _flush_section_text(self) -> None:
        if self._buffer.strip():
            self._warn("text inside a tool-calls section kept as content")
            self._emit(ContentDelta(self._buffer))
        self._buffer = ""

    # -- plumbing ----------------------------------------------------------------------
    def _flush_detok(self) -> None:
        if self._detok is not None:
            self._on_text(self._detok.flush())
            self._detok = None

    def _emit(self, event: ToolCallEvent) -> None:
        self._out.append(event)

    def _warn(self, message: str) -> None:
        log.warning("tool-call parser: %s", message)
        self.warnings.append(message)

    def _drain(self) -> list[ToolCallEvent]:
        out, self._out = _coalesce(self._out), []
        self.events.extend(out)
        return out

    def _check_open(self) -> None:
        if self._state == "done":
            raise RuntimeError("StreamingToolCallParser: input after finish()")


def _coalesce(events: list[ToolCallEvent]) -> list[ToolCallEvent]:
    """Merge adjacent content deltas / argument deltas of the same call."""
    out: list[ToolCallEvent] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
            out[-1] = ContentDelta(last.text + event.text)
        elif (
            isinstance(event, ToolCallArgumentsDelta)
            and isinstance(last, ToolCallArgumentsDelta)
            and last.index == event.index
        ):
            out[-1] = ToolCallArgumentsDelta(event.index, last.text + event.text)
        else:
            out.append(event)
    return out


def collect(events: Iterable[ToolCallEvent], warnings: Sequence[str] = ()) -> ParsedOutput:
    """Assemble events into the final content + OpenAI `tool_calls` list."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = {
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
        elif isinstance(event, ToolCallArgumentsDelta):
            calls[event.index]["function"]["arguments"] += event.text
    return ParsedOutput("".join(content), [calls[i] for i in sorted(calls)], list(warnings))


def parse_tool_calls(text: str, tool_names: Iterable[str] | None = None) -> ParsedOutput:
    """Parse a complete model output (text with marker text)."""
    parser = StreamingToolCallParser(tool_names=tool_names)
    parser.feed(text)
    parser.finish()
    return parser.result()


def parse_tool_call_ids(
    ids: Sequence[int], tokenizer: KimiTokenizer, tool_names: Iterable[str] | None = None
) -> ParsedOutput:
    """Parse a complete model output given as token ids (markers recognised by id)."""
    parser = StreamingToolCallParser(tokenizer, tool_names)
    parser.feed_ids(ids)
    parser.finish()
    return parser.result()
