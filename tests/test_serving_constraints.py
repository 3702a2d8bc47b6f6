"""Constrained tool calls, tool_choice and response_format through `kimi-trt serve` with the
in-process runtime, driven by the official openai and anthropic clients (the checks are in
constraint_checks.py; test_serving_triton.py runs them over Triton)."""

from __future__ import annotations

import pytest

from tests.constraint_checks import check_anthropic, check_openai
from tests.serving_support import api_server, scripted_engine

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("constraints")
    with api_server(scripted_engine(root), root / "serve.log", "--default-max-tokens", "64") as b:
        yield b


def test_openai_constrained_tool_calls(server):
    check_openai(server)


def test_anthropic_tool_choice_and_output_format(server):
    check_anthropic(server)
