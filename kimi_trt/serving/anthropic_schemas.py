"""Request body of Anthropic's Messages API (`POST /v1/messages`), validated strictly.

Same rules as schemas.py: strict types, unknown fields refused, the few fields clients
send routinely (`metadata`, `service_tier`, `cache_control` on blocks, what the SDK dumps
of a response block sent back as history) accepted and unused.
Structured output is Anthropic's `output_config: {"format": {"type": "json_schema",
"schema": ...}}`; tool_choice is auto / any / tool (named) / none, with
`disable_parallel_tool_use`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, Tag, model_validator

from kimi_trt.serving.schemas import (
    Extensions,
    ObjectSchema,
    Strict,
    ToolName,
    tagged,
    unique_names,
)


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: ToolName
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    caller: dict[str, Any] | None = None  # what the SDK dumps of a response block
    toolset_name: str | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


_BLOCKS = {t: t for t in ("text", "tool_use", "tool_result")}
Block = Annotated[
    Annotated[TextBlock, Tag("type=text")]
    | Annotated[ToolUseBlock, Tag("type=tool_use")]
    | Annotated[ToolResultBlock, Tag("type=tool_result")],
    tagged("type", _BLOCKS, "a content block needs a type of text, tool_use or tool_result"),
]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDefinition(Strict):
    name: ToolName
    input_schema: ObjectSchema
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is required with type 'tool' (and only then)")
        return self


class JSONSchemaOutput(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: JSONSchemaOutput | None = None


class AnthropicMessagesRequest(Extensions):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None  # accepted, unused
    service_tier: str | None = None  # accepted, one tier

    @model_validator(mode="after")
    def _tools(self):
        names = [t.name for t in self.tools or ()]
        unique_names(names, "tools")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice: {choice.name!r} is not in tools")
        if choice is not None and choice.type == "any" and not names:
            raise ValueError("tool_choice: 'any' needs tools")
        return self

    @property
    def tool_choice_name(self) -> str:
        """'auto', 'none', 'required' (Anthropic's any) or the named tool."""
        choice = self.tool_choice
        if choice is None:
            return "auto"
        return {"any": "required", "tool": choice.name}.get(choice.type, choice.type)

    @property
    def parallel_tool_calls(self) -> bool:
        return not (self.tool_choice and self.tool_choice.disable_parallel_tool_use)

    @property
    def response_format(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config else None
        return None if fmt is None else {"type": "json_schema", "schema": fmt.schema_}
