"""Multi-rank serving of a TP2 engine: `mpirun -np 2 kimi-trt serve` (rank 0 serves, rank 1
follows the runtime's worker loop) and Triton leader mode (rank 0 tritonserver, rank 1
`kimi-trt triton-worker`). Both must produce the scripted tool call."""

from __future__ import annotations

import json

import openai
import pytest

from kimi_trt.serving.triton_repo import write_triton_repo
from kimi_trt.serving.triton_server import TritonServer
from tests.serving_support import (
    ARGUMENTS,
    MESSAGES,
    TOOLS,
    api_server,
    script_tokens,
    scripted_engine,
)
from tests.test_serving_triton import grpc_generate, scripted_chat_inputs

pytestmark = [pytest.mark.serving, pytest.mark.mpi]


@pytest.fixture(scope="module")
def engine_tp2(tmp_path_factory):
    return scripted_engine(tmp_path_factory.mktemp("multirank"), tp=2)


def test_mpirun_serve_two_ranks(engine_tp2, tmp_path):
    with api_server(engine_tp2, tmp_path / "serve.log", ranks=2) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="kimi-k2", messages=MESSAGES, tools=TOOLS, temperature=0
        )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == json.loads(ARGUMENTS)


def test_triton_leader_mode_two_ranks(engine_tp2, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(engine_tp2, repo)
    values = scripted_chat_inputs(engine_tp2)
    server = TritonServer(repo, engine_dir=engine_tp2, world_size=2, log_file=tmp_path / "t.log")
    assert server.command[0].endswith("mpirun")
    with server:
        responses, reason = grpc_generate(server.grpc_url, values)
    tokens = [int(t) for r in responses for t in r.as_numpy("output_ids")]
    assert tokens == script_tokens(engine_tp2) and reason == "stop"
