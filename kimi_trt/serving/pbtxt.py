"""Write Triton `config.pbtxt` files (protobuf text format) from plain Python data.

Why our own writer instead of building `model_config_pb2.ModelConfig` messages: the
repository generator must run without tritonclient installed (it is a `serve` extra),
and plain dicts are easy to read and test. The tests parse every generated file with
Triton's own schema (`tritonclient.grpc.model_config_pb2.ModelConfig`), so a typo in a
field name or an enum value fails there.

Conventions: dict -> message, list of dicts -> repeated message (`name [ {...}, {...} ]`),
list of scalars -> repeated scalar, `Enum("TYPE_INT32")` -> an unquoted enum value,
str -> quoted string, bool -> true/false. Map fields such as `parameters` are repeated
messages of `{key, value}`; `string_parameters()` builds that list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value, written without quotes (e.g. TYPE_INT32, KIND_CPU)."""

    name: str


def string_parameters(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`parameters` map entries; every value becomes a string, as Triton backends expect."""
    out = []
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        out.append({"key": key, "value": {"string_value": str(value)}})
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string
    raise TypeError(f"pbtxt: cannot write a value of type {type(value).__name__}")


def _lines(data: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            out += [f"{pad}{key} {{", *_lines(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
            out.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                sep = "," if i < len(value) - 1 else ""
                out += [f"{pad}  {{", *_lines(item, indent + 2), f"{pad}  }}{sep}"]
            out.append(f"{pad}]")
        elif isinstance(value, (list, tuple)):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")
    return out


def to_pbtxt(config: Mapping[str, Any], header: str | None = None) -> str:
    """The text-format rendering of `config` (keys in insertion order), with `# header`."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    return "\n".join(lines + _lines(config, 0)) + "\n"
