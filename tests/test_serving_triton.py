"""Triton: generated repositories (parsed with Triton's own schema), and a real tritonserver
(the binary bundled with nvidia-pytriton) serving them on 127.0.0.1 to tritonclient gRPC
and HTTP, and to `kimi-trt serve --triton` driven by the openai client."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.runtime.scheduling import Scheduling
from kimi_trt.serving.repo_spec import RepoOptions
from kimi_trt.serving.triton_repo import write_triton_repo
from kimi_trt.serving.triton_server import ServerPorts, TritonServer, leader_mode_command
from tests.conftest import cli_env
from tests.constraint_checks import TIME_SCHEMA, TIME_TOOL, check_anthropic, check_openai
from tests.serving_support import (
    ARGUMENTS,
    CONTENT,
    MESSAGES,
    TOOL_NAME,
    TOOLS,
    api_server,
    script_tokens,
    scripted_engine,
)

pytestmark = pytest.mark.serving
SMALL_VOCAB = Path(__file__).resolve().parent.parent / "kimi_trt" / "assets" / "small-vocab"


def load_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def load_repo(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: load_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def fake_trtllm_engine(root: Path, world: int, max_batch: int = 16) -> Path:
    """An engine dir as `kimi-trt build` (backend trtllm) leaves it; engine bytes are not read."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "1.2.1",
        "pretrained_config": {
            "architecture": "KimiK2ForCausalLM",
            "vocab_size": 1280,
            "mapping": {"world_size": world, "tp_size": world, "pp_size": 1},
            "kimi_trt": {"hf_config": {"eos_token_id": 1025}},
        },
        "build_config": {
            "max_batch_size": max_batch,
            "max_input_len": 1024,
            "max_seq_len": 2048,
            "max_beam_width": 1,
            "max_num_tokens": 4096,
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    for rank in range(world):
        (root / f"rank{rank}.engine").write_bytes(b"\0")
    for f in SMALL_VOCAB.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    return root


def check_ensemble(models: dict[str, model_config_pb2.ModelConfig]) -> None:
    """Every step's maps name real tensors of its model, with matching data types."""
    ensemble = models["ensemble"]
    types = {i.name: i.data_type for i in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = models[step.model_name]
        inputs = {i.name: i for i in model.input}
        outputs = {o.name: o for o in model.output}
        for key, value in step.input_map.items():
            assert key in inputs, (step.model_name, key)
            assert types[value] == inputs[key].data_type, (step.model_name, key)
        required = {n for n, i in inputs.items() if not i.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        for key, value in step.output_map.items():
            assert key in outputs, (step.model_name, key)
            types[value] = outputs[key].data_type
    for out in ensemble.output:
        assert types[out.name] == out.data_type


@pytest.mark.parametrize("world", [1, 4])
def test_trtllm_repository(tmp_path, world):
    engine = fake_trtllm_engine(tmp_path / "engine", world)
    repo = tmp_path / "repo"
    write_triton_repo(engine, repo)
    models = load_repo(repo)
    assert set(models) == {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble"}
    llm = models["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.max_batch_size == 16
    assert llm.model_transaction_policy.decoupled
    p = params(llm)
    assert p["gpt_model_path"] == str(engine.resolve())
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["max_beam_width"] == "1"
    assert p["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert float(p["kv_cache_free_gpu_mem_fraction"]) == 0.9
    if world > 1:
        assert p["participant_ids"] == "0,1,2,3" and p["gpu_device_ids"] == "0,1,2,3"
    else:
        assert "participant_ids" not in p
    for name in ("preprocessing", "postprocessing"):
        assert params(models[name])["tokenizer_dir"] == str(engine.resolve())
        assert (repo / name / "1" / "model.py").is_file()
    check_ensemble(models)
    assert not (tmp_path / "repo.partial").exists()


def test_trtllm_repository_options_via_cli(tmp_path):
    engine = fake_trtllm_engine(tmp_path / "engine", 2)
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "kimi_trt.cli", "triton-repo", "--engine-dir", str(engine)]
    cmd += ["--out", str(repo), "--no-streaming", "--max-batch-size", "4"]
    cmd += ["--kv-cache-free-gpu-mem-fraction", "0.5", "--batch-scheduler-policy"]
    cmd += ["max_utilization", "--enable-kv-cache-reuse", "--gpu-device-ids", "2,3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0, done.stderr
    llm = load_repo(repo)["tensorrt_llm"]
    p = params(llm)
    assert not llm.model_transaction_policy.decoupled and llm.max_batch_size == 4
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.5"
    assert p["batch_scheduler_policy"] == "max_utilization"
    assert p["enable_kv_cache_reuse"] == "true" and p["gpu_device_ids"] == "2,3"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("none", [], "engine dir not found"),
        ("world", [], "world_size 4 but 2 rank*.engine"),
        ("notok", [], "tiktoken.model"),
        ("full", [], "not empty"),
        ("ok", ["--gpu-device-ids", "0,x"], "comma-separated integers"),
        ("ok", ["--kv-cache-free-gpu-mem-fraction", "1.5"], "kv_cache_free_gpu_mem_fraction"),
    ],
)
def test_triton_repo_user_errors(tmp_path, setup, args, message):
    engine, out = tmp_path / "engine", tmp_path / "repo"
    if setup != "none":
        fake_trtllm_engine(engine, 2)
    if setup == "world":
        cfg = json.loads((engine / "config.json").read_text())
        cfg["pretrained_config"]["mapping"]["world_size"] = 4
        (engine / "config.json").write_text(json.dumps(cfg))
    if setup == "notok":
        (engine / "tiktoken.model").unlink()
    if setup == "full":
        out.mkdir()
        (out / "something").write_text("x")
    cmd = [sys.executable, "-m", "kimi_trt.cli", "triton-repo", "--engine-dir", str(engine)]
    done = subprocess.run(
        cmd + ["--out", str(out), *args], capture_output=True, text=True, env=cli_env()
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_leader_mode_commands(tmp_path):
    repo, engine = tmp_path / "repo", tmp_path / "engine"
    ports = ServerPorts(1, 2, 3)
    trt = leader_mode_command(repo, engine, 2, "trtllm", ports, "127.0.0.1")
    ranks = " ".join(trt).split(" : ")
    assert len(ranks) == 2 and all("tritonserver" in r for r in ranks)
    assert "--load-model=tensorrt_llm" in ranks[1] and "--load-model" not in ranks[0]
    torch_cmd = " ".join(leader_mode_command(repo, engine, 3, "torch", ports, "127.0.0.1"))
    ranks = torch_cmd.split(" : ")
    assert len(ranks) == 3 and "tritonserver" in ranks[0]
    assert all("triton-worker --engine-dir" in r for r in ranks[1:])


# ---- a real tritonserver ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return scripted_engine(tmp_path_factory.mktemp("triton"))


def test_torch_repository(engine_dir, tmp_path):
    opts = RepoOptions(triton_max_batch_size=3, scheduling=Scheduling("static", 64, False))
    write_triton_repo(engine_dir, tmp_path / "repo", opts)
    models = load_repo(tmp_path / "repo")
    assert set(models) == {"kimi", "kimi_sync"}
    kimi, sync = models["kimi"], models["kimi_sync"]
    assert kimi.backend == sync.backend == "python"
    assert kimi.model_transaction_policy.decoupled and not sync.model_transaction_policy.decoupled
    assert params(kimi)["engine_dir"] == str(engine_dir.resolve())
    assert params(sync)["target_model"] == "kimi"
    assert Scheduling.from_parameters(params(kimi)) == opts.scheduling
    assert params(kimi)["max_batch_size"] == "3"
    assert {i.name for i in sync.input} <= {i.name for i in kimi.input}
    for name in models:
        shim = (tmp_path / "repo" / name / "1" / "model.py").read_text()
        assert "TritonPythonModel" in shim and str(Path(__file__).parents[1]) in shim


@pytest.fixture(scope="module")
def triton(engine_dir, tmp_path_factory):
    """tritonserver with the torch repository and the TensorRT-LLM repository's text models."""
    root = tmp_path_factory.mktemp("repos")
    write_triton_repo(engine_dir, root / "torch_repo")
    write_triton_repo(fake_trtllm_engine(root / "trt_engine", 1), root / "trt_repo")
    server = TritonServer(
        root / "torch_repo",
        extra_repos=(root / "trt_repo",),
        load_only=["kimi", "kimi_sync", "preprocessing", "postprocessing"],
        log_file=root / "triton.log",
    )
    with server:
        yield server


def _inputs(module, values: dict[str, np.ndarray]) -> list:
    out = []
    for name, value in values.items():
        dtype = "BYTES" if value.dtype == np.object_ else module.np_to_triton_dtype(value.dtype)
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


def grpc_generate(url: str, values: dict[str, np.ndarray], cancel_after: int | None = None):
    """Stream one request on the `kimi` model; returns (responses, finish_reason)."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("kimi", _inputs(grpcclient, values))
    responses, reason = [], None
    try:
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            responses.append(result)
            reason = result.as_numpy("finish_reason")[0].decode()
            if reason or (cancel_after is not None and len(responses) >= cancel_after):
                break
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return responses, reason


def scripted_chat_inputs(engine_dir: Path) -> dict[str, np.ndarray]:
    """The tool-calling chat prompt (what the scripted engine answers), greedy, as model inputs."""
    prompt = KimiTokenizer.from_dir(engine_dir).apply_chat_template(MESSAGES, tools=TOOLS)
    return {
        "input_ids": np.asarray(prompt, dtype=np.int32),
        "request_output_len": np.asarray([64], dtype=np.int32),
        "temperature": np.asarray([0.0], dtype=np.float32),
    }


def test_grpc_streaming_follows_the_script(triton, engine_dir):
    responses, reason = grpc_generate(triton.grpc_url, scripted_chat_inputs(engine_dir))
    tokens = [int(t) for r in responses for t in r.as_numpy("output_ids")]
    assert tokens == script_tokens(engine_dir) and reason == "stop"
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
    assert text == KimiTokenizer.from_dir(engine_dir).decode(tokens, skip_special=True)
    assert text.startswith(CONTENT)  # the reserved token the model wrote is not text
    assert len(responses) == len(tokens) + 1  # one per token, then the final one


def test_http_sync_model_equals_stream(triton, engine_dir):
    values = {
        "text_input": np.asarray([b"Hello there"], dtype=np.object_),
        "request_output_len": np.asarray([12], dtype=np.int32),
        "temperature": np.asarray([0.0], dtype=np.float32),
    }
    client = httpclient.InferenceServerClient(triton.http_url)
    result = client.infer("kimi_sync", _inputs(httpclient, values))
    client.close()
    responses, reason = grpc_generate(triton.grpc_url, values)
    streamed = [int(t) for r in responses for t in r.as_numpy("output_ids")]
    assert result.as_numpy("output_ids").tolist() == streamed and len(streamed) == 12
    assert result.as_numpy("finish_reason")[0].decode() == reason == "length"
    tokenizer = KimiTokenizer.from_dir(engine_dir)
    assert result.as_numpy("text_output")[0].decode() == tokenizer.decode(
        streamed, skip_special=True
    )


def test_bad_request_is_a_triton_error(triton):
    client = httpclient.InferenceServerClient(triton.http_url)
    values = {"request_output_len": np.asarray([4], dtype=np.int32)}
    with pytest.raises(Exception, match="input_ids or text_input"):
        client.infer("kimi_sync", _inputs(httpclient, values))
    values = {
        "input_ids": np.asarray([1] * 5000, dtype=np.int32),
        "request_output_len": np.asarray([4], dtype=np.int32),
    }
    with pytest.raises(Exception, match="accepts at most"):
        client.infer("kimi_sync", _inputs(httpclient, values))
    client.close()


def triton_metric(server: TritonServer, key: str) -> float:
    for line in httpx.get(server.metrics_url).text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def test_grpc_cancel_frees_the_engine(triton):
    """A cancelled 2000-token request must not hold the engine: the next one runs at once
    (uncancelled, it would hold the batcher for 2000 decode steps, >= 13 s here). It has
    no stop tokens, so nothing but the cancel can end it early (with the default stops the
    scripted model ends this prompt after 33 tokens: a slow cancel then lost the race and
    the request finished "stop" - the old flakiness of this test)."""
    long = {
        "text_input": np.asarray([b"Once upon a time"], dtype=np.object_),
        "request_output_len": np.asarray([2000], dtype=np.int32),
        "temperature": np.asarray([0.0], dtype=np.float32),
        "stop_token_ids": np.asarray([], dtype=np.int32),
    }
    finished = 'kimi_trt_triton_requests_finished{model="kimi",reason="cancelled"}'
    before = triton_metric(triton, finished)
    tokens_before = triton_metric(triton, 'kimi_trt_triton_generated_tokens{model="kimi"}')
    responses, _ = grpc_generate(triton.grpc_url, long, cancel_after=3)
    assert len(responses) == 3
    start = time.monotonic()
    short = dict(long, request_output_len=np.asarray([4], dtype=np.int32))
    responses, reason = grpc_generate(triton.grpc_url, short)
    assert reason == "length" and time.monotonic() - start < 8
    for _ in range(50):  # Triton publishes metrics periodically
        if triton_metric(triton, finished) > before:
            break
        time.sleep(0.1)
    assert triton_metric(triton, finished) == before + 1
    generated = triton_metric(triton, 'kimi_trt_triton_generated_tokens{model="kimi"}')
    assert generated - tokens_before < 2000


def test_kimi_model_batches_continuously(triton, engine_dir):
    """A short request sent while a 400-token one streams is answered (by the script) while
    most of the long one is still to come, and the long one runs on to its length."""
    long = {
        "text_input": np.asarray([b"Once upon a time"], dtype=np.object_),
        "request_output_len": np.asarray([400], dtype=np.int32),
        "temperature": np.asarray([0.0], dtype=np.float32),
        "stop_token_ids": np.asarray([], dtype=np.int32),
    }
    received: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    client.async_stream_infer("kimi", _inputs(grpcclient, long))
    responses = [received.get(timeout=60)]
    try:
        short, reason = grpc_generate(triton.grpc_url, scripted_chat_inputs(engine_dir))
        long_tokens_meanwhile = len(responses) + received.qsize()
        while not responses[-1][0].as_numpy("finish_reason")[0]:
            responses.append(received.get(timeout=120))
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in responses)
    tokens = [int(t) for r in short for t in r.as_numpy("output_ids")]
    assert tokens == script_tokens(engine_dir) and reason == "stop"
    assert responses[-1][0].as_numpy("finish_reason")[0].decode() == "length"
    assert len(responses) == 401 and long_tokens_meanwhile < 200
    total = 'kimi_trt_triton_kv_blocks_total{model="kimi"}'
    for _ in range(50):  # Triton publishes metrics periodically
        if triton_metric(triton, total) > 0:
            break
        time.sleep(0.1)
    assert triton_metric(triton, total) > 0
    assert triton_metric(triton, 'kimi_trt_triton_running{model="kimi"}') == 0


def test_trtllm_text_models(triton, engine_dir):
    """The TensorRT-LLM repository's preprocessing/postprocessing with KimiTokenizer."""
    tokenizer = KimiTokenizer.from_dir(SMALL_VOCAB)
    client = httpclient.InferenceServerClient(triton.http_url)
    queries = [b"Hello there", b"<|im_user|>user<|im_middle|>hi<|im_end|>"]
    pre = client.infer(
        "preprocessing",
        _inputs(
            httpclient,
            {
                "QUERY": np.asarray([[q] for q in queries], dtype=np.object_),
                "REQUEST_OUTPUT_LEN": np.asarray([[8], [8]], dtype=np.int32),
            },
        ),
    )
    ids, lengths = pre.as_numpy("INPUT_ID"), pre.as_numpy("REQUEST_INPUT_LEN")
    for row, query in enumerate(queries):
        expected = tokenizer.encode(query.decode())
        assert ids[row, : lengths[row, 0]].tolist() == expected
    eos, im_end = tokenizer.eos_token_ids
    assert pre.as_numpy("OUT_END_ID").tolist() == [[im_end], [im_end]]
    assert pre.as_numpy("STOP_WORDS_IDS")[0].tolist() == [[eos], [1]]
    tokens = np.asarray([[tokenizer.encode("Paris is sunny") + [0, 0]]], dtype=np.int32)
    post = client.infer(
        "postprocessing",
        _inputs(
            httpclient,
            {
                "TOKENS_BATCH": tokens,
                "SEQUENCE_LENGTH": np.asarray([[tokens.shape[2] - 2]], dtype=np.int32),
            },
        ),
    )
    assert post.as_numpy("OUTPUT")[0, 0].decode() == "Paris is sunny"
    client.close()


def test_openai_api_over_triton(triton, engine_dir, tmp_path):
    with api_server(engine_dir, tmp_path / "serve.log", "--triton", triton.grpc_url) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="kimi-k2", messages=MESSAGES, tools=TOOLS, temperature=0)
        whole = client.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content == CONTENT
        (call,) = whole.message.tool_calls
        assert call.function.name == TOOL_NAME
        assert json.loads(call.function.arguments) == json.loads(ARGUMENTS)
        chunks = list(client.chat.completions.create(**kw, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        args = "".join(
            tc.function.arguments or ""
            for c in chunks
            if c.choices
            for tc in c.choices[0].delta.tool_calls or []
        )
        assert content == CONTENT and args == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # a client gone mid-stream cancels through gRPC: Triton's engine is free at once.
        # Greedy from "The" the scripted model writes no stop token in 2000 tokens, so only
        # the cancel can end it early (sampled, it could stop before the cancel arrived)
        finished = 'kimi_trt_triton_requests_finished{model="kimi",reason="cancelled"}'
        before = triton_metric(triton, finished)
        body = {"model": "kimi-k2", "prompt": "The", "max_tokens": 2000, "stream": True}
        body["temperature"] = 0
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
        # greedy: sampled, the scripted model's random weights may draw a stop token first
        short = client.completions.create(
            model="kimi-k2", prompt="Once", max_tokens=4, temperature=0
        )
        assert short.choices[0].finish_reason == "length"
        for _ in range(50):
            if triton_metric(triton, finished) > before:
                break
            time.sleep(0.1)
        assert triton_metric(triton, finished) == before + 1
        # a request Triton rejects: a 400 when whole, an error event when streamed
        body = {"model": "kimi-k2", "prompt": [99999], "max_tokens": 4}
        r = httpx.post(base + "/v1/completions", json=body)
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/completions", json={**body, "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert "vocabulary" in json.loads(events[0])["error"]["message"]
        assert events[-1] == "[DONE]"


def test_kimi_model_builds_the_constraint_from_output_spec(triton, engine_dir):
    """`output_spec` on the kimi model itself: the scripted call to get_weather becomes the
    one declared tool, get_time, with the counter's id and schema-valid arguments."""
    from jsonschema import Draft202012Validator

    from kimi_trt.chat.constraint import OutputSpec, tool_specs
    from kimi_trt.chat.tool_parser import parse_tool_call_ids

    spec = OutputSpec(tools=tool_specs([TIME_TOOL]), first_call_index=7)
    values = scripted_chat_inputs(engine_dir)
    values["output_spec"] = np.asarray([spec.to_json().encode()], dtype=np.object_)
    responses, reason = grpc_generate(triton.grpc_url, values)
    tokens = [int(t) for r in responses for t in r.as_numpy("output_ids")]
    parsed = parse_tool_call_ids(tokens, KimiTokenizer.from_dir(engine_dir), ["get_time"])
    (call,) = parsed.tool_calls
    assert call["id"] == "functions.get_time:7" and reason == "stop"
    Draft202012Validator(TIME_SCHEMA).validate(json.loads(call["function"]["arguments"]))
    values["output_spec"] = np.asarray([b'{"tools": 3}'], dtype=np.object_)
    client = httpclient.InferenceServerClient(triton.http_url)
    with pytest.raises(Exception, match="OutputSpec"):
        client.infer("kimi_sync", _inputs(httpclient, values))
    client.close()


def test_constrained_tool_calls_over_triton(triton, engine_dir, tmp_path):
    """The in-process checks (constraint_checks.py), with `kimi-trt serve --triton`."""
    with api_server(engine_dir, tmp_path / "serve.log", "--triton", triton.grpc_url) as base:
        check_openai(base)
        check_anthropic(base)


@pytest.mark.parametrize("kind", ["trtllm", "torch"])
def test_api_backend_inputs_match_the_repository(tmp_path, kind, request):
    """What `kimi-trt serve --triton` sends fits the generated model's inputs (name, type,
    shape), for the tensorrt_llm model too, which cannot run on this machine."""
    from kimi_trt.runtime.sampling import SamplingParams
    from kimi_trt.serving.backends import TritonBackend
    from kimi_trt.serving.repo_spec import summarize_engine

    if kind == "trtllm":
        engine = fake_trtllm_engine(tmp_path / "engine", 1)
    else:
        engine = request.getfixturevalue("engine_dir")
    write_triton_repo(engine, tmp_path / "repo")
    summary = summarize_engine(engine)
    backend = TritonBackend("127.0.0.1:1", summary, KimiTokenizer.from_dir(engine))
    config = load_repo(tmp_path / "repo")[backend.model]
    declared = {i.name: i for i in config.input}
    from kimi_trt.chat.constraint import OutputSpec

    sent = backend._inputs([5, 6, 7], SamplingParams(max_new_tokens=4, seed=3), OutputSpec())
    if kind == "trtllm":  # the tensorrt_llm model takes no output_spec: serve never sends one
        assert not backend.supports_constraints
        sent = [t for t in sent if t.name() != "output_spec"]
    required = {n for n, i in declared.items() if not i.optional}
    assert required <= {t.name() for t in sent}
    for tensor in sent:
        spec = declared[tensor.name()]
        assert tensor.datatype() == model_config_pb2.DataType.Name(spec.data_type)[5:].replace(
            "STRING", "BYTES"
        )
        shape = tensor.shape()[1:] if config.max_batch_size > 0 else tensor.shape()
        assert len(shape) == len(spec.dims), tensor.name()
        assert all(d == -1 or d == s for d, s in zip(spec.dims, shape, strict=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--engine-dir", "{missing}"], "engine dir not found"),
        (["serve", "--engine-dir", "{engine}", "--triton", "127.0.0.1:{port}"], "not reachable"),
        (["triton-server", "--model-repository", "{missing}"], "no kimi/ or tensorrt_llm/"),
    ],
)
def test_serving_cli_user_errors(engine_dir, tmp_path, args, message):
    from kimi_trt.serving.triton_server import free_port

    values = {"missing": tmp_path / "missing", "engine": engine_dir, "port": free_port()}
    cmd = [sys.executable, "-m", "kimi_trt.cli", *(a.format(**values) for a in args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_triton_server_command_stops_cleanly(engine_dir, tmp_path):
    """`kimi-trt triton-server` serves until SIGTERM, then takes tritonserver down with it."""
    from kimi_trt.serving.triton_server import free_port

    write_triton_repo(engine_dir, tmp_path / "repo")
    http = free_port()
    cmd = [sys.executable, "-m", "kimi_trt.cli", "triton-server", "--model-repository"]
    cmd += [str(tmp_path / "repo"), "--http-port", str(http)]
    cmd += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert "tritonserver ready" in proc.stdout.readline()
        ready = f"http://127.0.0.1:{http}/v2/health/ready"
        assert httpx.get(ready).status_code == 200
        proc.terminate()
        assert proc.wait(60) == 128 + 15
        with pytest.raises(httpx.ConnectError):
            httpx.get(ready)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_with_its_own_triton(engine_dir, tmp_path):
    """`kimi-trt serve --triton auto` starts tritonserver itself and stops it on exit."""

    def work_dirs() -> set[Path]:
        return {
            p
            for p in Path(tempfile.gettempdir()).glob("kimi_trt_triton_*")
            if (p / "repo").is_dir()
        }

    before = work_dirs()
    with api_server(engine_dir, tmp_path / "serve.log", "--triton", "auto") as base:
        backend = httpx.get(base + "/health").json()["backend"]  # "Triton at HOST:PORT, ..."
        assert backend.startswith("Triton at 127.0.0.1:")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="kimi-k2", messages=MESSAGES, tools=TOOLS, temperature=0
        )
        assert r.choices[0].finish_reason == "tool_calls"
        ours = work_dirs() - before
        assert len(ours) == 1
    assert not any(p.exists() for p in ours)  # its repository is gone, and its server:
    client = grpcclient.InferenceServerClient(backend.split()[2].rstrip(","))
    with pytest.raises(Exception, match="(?i)unavailable|connect"):
        client.is_server_live()
