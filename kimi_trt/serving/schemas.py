"""Request bodies of the OpenAI- and Anthropic-compatible endpoints, and their errors.

Unknown fields are accepted (clients send many optional ones); known fields are checked
for type and range, and anything we cannot honour (n > 1, logprobs, penalties) is
rejected with a 400 that names the parameter instead of being silently ignored.
`APIError` carries the HTTP status and is rendered OpenAI-style
(`{"error": {"message", "type", "param", "code"}}`) or Anthropic-style
(`{"type": "error", "error": {"type", "message"}}`) by the endpoint that raised it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    500: "api_error",
    503: "overloaded_error",
}


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


def validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the top-level parameter."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    # drop pydantic's union-member tags (e.g. "literal['auto','none']", "str") from the path
    path = [p for i, p in enumerate(loc) if i == 0 or p.isdigit() or p.isidentifier()]
    path = [p for p in path if p not in ("str", "int", "list", "dict", "float", "bool")]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    where = ".".join(path)
    return APIError(400, f"{where}: {message}" if where else message, param=loc[0] if loc else None)


def _unsupported(message: str) -> AfterValidator:
    """A parameter we cannot honour: any value but its default (0, False, None) is a 400."""

    def check(value):
        if value:
            raise ValueError(message)
        return value

    return AfterValidator(check)


_NO_PENALTIES = _unsupported("penalties are not supported (must be 0)")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = 1
    presence_penalty: Annotated[float, _NO_PENALTIES] = 0.0
    frequency_penalty: Annotated[float, _NO_PENALTIES] = 0.0
    logprobs: Annotated[bool | int | None, _unsupported("logprobs are not supported")] = None
    stream_options: dict[str, Any] | None = None

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
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none"] | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, dict):
            raise ValueError("only 'auto' and 'none' are supported")
        return v

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        for i, m in enumerate(v):
            if m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool")
        return v


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


class AnthropicMessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # extension (OpenAI's seed)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is not None and v.get("type") not in ("auto", "none"):
            raise ValueError("only tool_choice types 'auto' and 'none' are supported")
        return v
