"""Request bodies of the OpenAI- and Anthropic-compatible endpoints, and their errors.

Validation is strict, so a client's mistake is a 400 naming the parameter rather than a
500 or a silently ignored value:
- `parse_body` reads the JSON itself: invalid JSON, nesting deeper than MAX_JSON_DEPTH,
  integers longer than MAX_INT_DIGITS, NaN/Infinity and lone surrogates are refused with
  the path of the offending value;
- the models use pydantic strict mode (`"5"` is not an integer, `"yes"` not a boolean, 42
  not message content) and forbid unknown fields, except a few harmless ones clients send
  routinely (`user`, `metadata`, `store`, `service_tier`), which are accepted and unused;
- what we cannot honour (n > 1, logprobs, penalties, echo) is refused by name.
`APIError` carries the HTTP status and is rendered OpenAI-style
(`{"error": {"message", "type", "param", "code"}}`) or Anthropic-style
(`{"type": "error", "error": {"type", "message"}}`) by the endpoint that raised it.
Anthropic's bodies are in anthropic_schemas.py; the pieces both share are here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    500: "api_error",
    503: "overloaded_error",
}
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 64
# Union-member tags pydantic puts in an error's location; not parameter names. (Our
# discriminated unions tag their members `role=...` / `type=...`, so no field is mistaken.)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        kind = ANTHROPIC_ERROR_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def _is_tag(part: str) -> bool:
    return part in _TYPE_TAGS or any(c in part for c in "[=") or part[:1].isupper()


def _location(loc: tuple, skip_tags: bool = True) -> str:
    """`messages[0].content` from pydantic's ('messages', 0, 'role=user', 'content', 'str')."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif skip_tags and i > 0 and _is_tag(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(err: ValidationError) -> APIError:
    """A 400 naming the parameter (and where inside it): of the first parameter's errors the
    deepest, which for a union (string or list of blocks) is the member that came closest."""
    errors = err.errors()
    same = [e for e in errors if e.get("loc", ())[:1] == errors[0].get("loc", ())[:1]]
    first = max(same, key=lambda e: len(e.get("loc", ())))
    loc = tuple(first.get("loc", ()))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unsupported parameter"
    where = _location(loc)
    param = str(loc[0]) if loc else None
    if param is None and (named := re.match(r"(\w+)[\[.:]", message)):
        param = named[1]  # a whole-model check names its parameter first
    return APIError(400, f"{where}: {message}" if where else message, param=param)


class _TooLong:
    """Stands for an integer literal past MAX_INT_DIGITS until the walk reports where it is."""

    def __init__(self, digits: int):
        self.digits = digits


def _int(text: str) -> int | _TooLong:
    digits = len(text.lstrip("-"))
    return _TooLong(digits) if digits > MAX_INT_DIGITS else int(text)


def _not_json(name: str) -> float:
    return math.nan  # NaN / Infinity are not JSON: reported by the walk


def _path(parts: list) -> str:
    path = _location(tuple(parts), skip_tags=False) or "body"
    return path if len(path) <= 120 else path[:117] + "..."


def _check_value(value: Any, parts: list) -> None:
    if isinstance(value, _TooLong):
        raise APIError(
            400,
            f"{_path(parts)}: an integer of {value.digits} digits (at most {MAX_INT_DIGITS})",
            param=str(parts[0]) if parts else None,
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{_path(parts)}: NaN and Infinity are not JSON", param=_top(parts))
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, f"{_path(parts)}: a lone UTF-16 surrogate is not text", param=_top(parts)
            ) from None


def _top(parts: list) -> str | None:
    return str(parts[0]) if parts else None


def check_json_values(body: Any) -> None:
    """APIError naming the first value that is too deep, too long a number, NaN or not text."""
    stack: list[tuple[Any, list, int]] = [(body, [], 0)]
    while stack:
        value, parts, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400, f"{_path(parts)}: nested deeper than {MAX_JSON_DEPTH}", param=_top(parts)
            )
        if isinstance(value, dict):  # pushed in reverse: the first bad value is reported
            for key in reversed(value):
                _check_value(key, parts)
                stack.append((value[key], [*parts, key], depth + 1))
        elif isinstance(value, list):
            stack.extend((value[i], [*parts, i], depth + 1) for i in reversed(range(len(value))))
        else:
            _check_value(value, parts)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it and where."""
    try:
        body = json.loads(raw, parse_int=_int, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({e.msg} at position {e.pos})",
            code="invalid_json",
        ) from None
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not UTF-8 JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(
            400, f"The request body is nested deeper than {MAX_JSON_DEPTH}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    check_json_values(body)
    return body


def _unsupported(message: str) -> AfterValidator:
    """A parameter we cannot honour: any value but its default (0, False, None) is a 400."""

    def check(value):
        if value:
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters: a JSON Schema for an object (what Kimi's arguments are)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if schema.get("type", "object") != "object":
        raise ValueError("must be a JSON Schema of type 'object'")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"not a valid JSON Schema ({e.message[:200]})") from None
    return schema


_NO_PENALTIES = _unsupported("penalties are not supported (must be 0)")
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ObjectSchema = Annotated[dict[str, Any], AfterValidator(_object_schema)]


class Strict(BaseModel):
    """Strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Extensions(Strict):
    """Our request extensions, on both APIs (vLLM spells the first the same way)."""

    skip_special_tokens: bool = True  # special tokens left out of returned text
    constrain_tool_calls: bool | None = None  # None: the server's --constrain-tool-calls
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class _Request(Extensions):
    model: str
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = 1
    presence_penalty: Annotated[float, _NO_PENALTIES] = 0.0
    frequency_penalty: Annotated[float, _NO_PENALTIES] = 0.0
    logprobs: Annotated[bool | int | None, _unsupported("logprobs are not supported")] = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    metadata: dict[str, str] | None = None  # accepted, unused
    store: bool | None = None  # accepted, nothing is stored
    service_tier: str | None = None  # accepted, one tier

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionCall(Strict):
    name: ToolName
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # what a client that assembled a stream may send back


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _something(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


def tagged(field: str, tags: dict[str, str], message: str) -> Discriminator:
    """A discriminator on `field` whose member tags read `field=value` (see `_location`)."""

    def tag(value: Any) -> str | None:
        key = value.get(field) if isinstance(value, dict) else None
        return f"{field}={tags[key]}" if isinstance(key, str) and key in tags else None

    return Discriminator(tag, custom_error_type="invalid_" + field, custom_error_message=message)


_ROLES = {r: r for r in ("system", "user", "assistant", "tool")} | {"developer": "system"}
Message = Annotated[
    Annotated[SystemMessage, Tag("role=system")]
    | Annotated[UserMessage, Tag("role=user")]
    | Annotated[AssistantMessage, Tag("role=assistant")]
    | Annotated[ToolMessage, Tag("role=tool")],
    tagged("role", _ROLES, "a message needs a role of system, developer, user, assistant or tool"),
]


class FunctionDefinition(Strict):
    name: ToolName
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None  # every declared call is enforced anyway (when constrained)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: ToolName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    name: str
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def spec(self) -> dict[str, Any] | None:
        """The constraint's response_format (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "schema": self.json_schema.schema_ or {}}


def unique_names(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{where}[{i}]: tool name {name!r} is declared twice")
        seen.add(name)


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or ()]
        unique_names(names, "tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: {choice.function.name!r} is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        return self

    @property
    def tool_choice_name(self) -> str:
        """'auto', 'none', 'required' or the named function."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: Annotated[bool, _unsupported("echo is not supported")] = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        if not v:
            raise ValueError("the prompt is empty")
        return v
