"""Backend llmapi without TensorRT-LLM: the options it writes, checked against the pinned
TensorRT-LLM's field names; the checkpoint checks and UE8M0 requantisation; the runtime
adapter's pure parts (LLM() arguments, SamplingParams mapping). What needs tensorrt_llm
itself is at the end and skips with the reason where it is absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kimi_trt.config import build_config_from_dict, load_model_config
from kimi_trt.convert.reader import HFCheckpoint
from kimi_trt.errors import CheckpointError, ConfigError, MissingCapability, UserError
from kimi_trt.llmapi.checkpoint import check_checkpoint, requantize_ue8m0
from kimi_trt.llmapi.options import (
    NESTED,
    llm_api_options,
    option_problems,
    pinned_fields,
    read_options,
    write_options,
)
from kimi_trt.llmapi.support import llmapi_problems
from kimi_trt.runtime.llmapi_backend import (
    LlmApiEngine,
    llm_kwargs,
    read_llmapi_dir,
    sampling_kwargs,
    tensorrt_llm_problem,
)
from kimi_trt.runtime.sampling import SamplingParams
from tests.conftest import K2_CONFIG, REPO


def _build(**raw):
    base = {"checkpoint": "c", "output_dir": "o", "gpu": "h200", "backend": "llmapi"}
    return build_config_from_dict({**base, **raw}, "test.yaml")


def test_the_stored_field_lists_name_their_source_and_pin():
    pinned = pinned_fields()
    assert pinned["pinned"] == "tensorrt-llm==1.2.1"
    src = pinned["sources"]["tensorrt_llm/llmapi/llm_args.py"]
    assert set(src["classes"]) == {"BaseLlmArgs", "TorchLlmArgs", *NESTED.values()}
    assert len(src["read_at"].split("@")[1]) == 40  # a commit, not a branch
    for cls in src["classes"]:
        names = pinned["classes"][cls]
        assert names and len(names) == len(set(names)), cls


@pytest.mark.parametrize("config", ["b200_ep8", "h200_ep8", "h100_ep16_2node", "tiny_gpu_llmapi"])
def test_every_option_written_is_a_pinned_field(config):
    from kimi_trt.config import load_build_config

    options = llm_api_options(load_build_config(REPO / "build_configs" / f"{config}.yaml"))
    assert option_problems(options) == []
    classes = pinned_fields()["classes"]
    top = set(classes["BaseLlmArgs"]) | set(classes["TorchLlmArgs"])
    assert set(options) <= top
    for key, cls in NESTED.items():
        assert set(options.get(key, {})) <= set(classes[cls])


def test_options_carry_the_layout_limits_and_cache():
    b = _build(
        parallelism={"tp": 8, "ep": 4, "moe_tp": 2, "attention_dp": True},
        kv_cache_dtype="fp8",
        kv_cache_free_gpu_mem_fraction=0.8,
        limits={"max_batch_size": 32, "max_input_len": 100, "max_seq_len": 200},
        llm_api={"moe_backend": "DEEPGEMM", "stream_interval": 10},
    )
    o = llm_api_options(b)
    assert (o["tensor_parallel_size"], o["moe_expert_parallel_size"]) == (8, 4)
    assert (o["moe_tensor_parallel_size"], o["enable_attention_dp"]) == (2, True)
    assert o["kv_cache_config"] == {"dtype": "fp8", "free_gpu_memory_fraction": 0.8}
    assert o["cuda_graph_config"] == {"enable_padding": True, "max_batch_size": 32}
    assert o["moe_config"] == {"backend": "DEEPGEMM"} and o["stream_interval"] == 10
    assert (o["max_batch_size"], o["max_input_len"], o["max_seq_len"]) == (32, 100, 200)
    assert llm_api_options(_build(kv_cache_dtype="bf16"))["kv_cache_config"]["dtype"] == "auto"


def test_unknown_keys_and_values_are_named():
    o = llm_api_options(_build())
    o["kv_cache_config"]["free_gpu_mem_fraction"] = 0.5  # the engine workflow's spelling
    o["moe_config"]["backend"] = "DEEP_GEMM"
    o["enable_attention_data_parallel"] = True
    problems = option_problems(o)
    assert any("enable_attention_data_parallel" in p for p in problems)
    assert any(
        "kv_cache_config.free_gpu_mem_fraction: not a KvCacheConfig field" in p for p in problems
    )
    assert any("'DEEP_GEMM' is not one of" in p for p in problems)


def test_options_file_round_trips_and_refuses_unknown_keys(tmp_path):
    o = llm_api_options(_build())
    path = write_options(tmp_path / "opts.yaml", o, "header line")
    assert path.read_text().startswith("# header line\n")
    assert read_options(path) == o
    path.write_text("tensor_parallel_size: 2\nmax_tokens_in_paged_kv_cache: 9\n")
    with pytest.raises(ConfigError, match="max_tokens_in_paged_kv_cache: not a TorchLlmArgs"):
        read_options(path)
    for data, fragment in (
        (b'backend: "\xff"\n', "not UTF-8 text (byte 10)"),
        (b"[" * 10_000 + b"]" * 10_000, "malformed YAML (nested too deeply)"),
        (b"a: [", "malformed YAML at line 1: expected the node content"),
    ):
        path.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            read_options(path)
        assert str(e.value).startswith(f"{path}: ") and fragment in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"gpu": "cpu"}, "NVIDIA GPUs"),
        ({"weights": {"experts": "int8_wo"}}, "loads the block-FP8 checkpoint as it is"),
        ({"weights": {"embeddings": "fp32"}}, "bf16 embeddings"),
        ({"kv_cache_dtype": "fp32"}, "caches fp8 or bf16"),
    ],
)
def test_llmapi_support_rules(raw, words):
    k2 = load_model_config(K2_CONFIG)
    assert llmapi_problems(_build(), k2) == []
    problems = llmapi_problems(_build(**raw), k2)
    assert len(problems) == 1 and words in problems[0], problems


def test_checkpoint_check_names_a_bad_scale(tiny_ckpt, tmp_path):
    model = load_model_config(tiny_ckpt)
    _, summary = check_checkpoint(tiny_ckpt, model)
    assert summary["tensors"] > 0 and summary["unknown_tensors"] == []
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    reader, _ = HFCheckpoint.open(bad, model)
    name = next(n for n in reader.tensors if n.endswith("weight_scale_inv"))
    info = reader.tensors[name]
    with open(bad / info.file, "r+b") as f:  # first scale -> -1.0 (float32)
        f.seek(info.offset)
        f.write(torch.tensor([-1.0]).numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"{name} has 1 non-positive scales"):
        check_checkpoint(bad, model)


def test_ue8m0_requantisation_writes_power_of_two_scales_and_reports_the_error(tiny_ckpt, tmp_path):
    model = load_model_config(tiny_ckpt)
    reader, _ = check_checkpoint(tiny_ckpt, model)
    files, errors = requantize_ue8m0(reader, tmp_path / "ue8m0", lambda s: None)
    assert errors and all(0 < e["max_rel_err"] < 0.2 for e in errors.values())
    again, summary = check_checkpoint(tmp_path / "ue8m0", model)  # a valid checkpoint
    assert summary["tensors"] == len(reader.tensors)
    assert (tmp_path / "ue8m0" / "config.json").is_file()
    scales = [n for n in again.tensors if n.endswith("weight_scale_inv")]
    for name in scales[:20]:
        s = again.read(name)
        assert np.array_equal(s, np.exp2(np.round(np.log2(s))))
    index = json.loads((tmp_path / "ue8m0" / "model.safetensors.index.json").read_text())
    weight = scales[0].removesuffix("_scale_inv")
    assert index["weight_map"][weight] == index["weight_map"][scales[0]]
    with safe_open(str(tmp_path / "ue8m0" / index["weight_map"][weight]), "pt") as f:
        assert weight in f.keys()


# Requantises argv[1] into argv[2]; after the argv[4]-th shard is logged, no file may grow
# past argv[3] bytes (RLIMIT_FSIZE, SIGXFSZ ignored: the write fails with EFBIG), a real
# disk-full interruption at a chosen point.
_INTERRUPTED = """
import resource, signal, sys
from pathlib import Path
from kimi_trt.config import load_model_config
from kimi_trt.llmapi.checkpoint import check_checkpoint, requantize_ue8m0
src, out, limit, after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reader, _ = check_checkpoint(src, load_model_config(src))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
logged = []
def log(line):
    logged.append(line)
    if len(logged) == after:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
requantize_ue8m0(reader, out, log)
"""


@pytest.mark.parametrize(
    "after, limit",
    [(1, 0), (3, 0), (3, 2000)],
    ids=["second-shard-fails", "after-the-shards-nothing-fits", "config-fits-index-does-not"],
)
def test_an_interrupted_ue8m0_copy_leaves_no_file_that_looks_complete(
    tiny_ckpt, tmp_path, after, limit
):
    """Every file of the UE8M0 copy is whole or absent, and the index (what makes it a
    checkpoint) only exists once everything else does; a rerun completes it."""
    import subprocess
    import sys

    model = load_model_config(tiny_ckpt)
    full = tmp_path / "full"
    requantize_ue8m0(check_checkpoint(tiny_ckpt, model)[0], full, lambda s: None)
    want = {p.name: p.read_bytes() for p in full.iterdir()}
    out = tmp_path / "ue8m0"
    argv = [sys.executable, "-c", _INTERRUPTED, str(tiny_ckpt), str(out), str(limit), str(after)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors.index.json" not in left
    assert [n for n in left if n not in want] == []  # no *.tmp, nothing unknown
    assert [n for n, data in left.items() if data != want[n]] == []  # no partial file
    requantize_ue8m0(check_checkpoint(tiny_ckpt, model)[0], out, lambda s: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == want
    # readable by a server running as another user (safetensors' save_file makes 0600 files)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


def _llmapi_dir(tmp_path: Path, tiny_ckpt: Path) -> Path:
    from kimi_trt.build import run_build
    from tests.test_build import write_config

    cfg = write_config(tmp_path, "tiny_gpu_llmapi", tiny_ckpt)
    try:
        run_build(cfg, log=lambda s: None)
    except MissingCapability:  # no tensorrt_llm here: the dir is complete all the same
        assert tensorrt_llm_problem() is not None
    return tmp_path / "engine"


def test_llmapi_dir_reads_into_llm_arguments(tiny_ckpt, tmp_path):
    engine = _llmapi_dir(tmp_path, tiny_ckpt)
    d = read_llmapi_dir(engine)
    kwargs = llm_kwargs(d)
    assert kwargs["model"] == str(tiny_ckpt) and kwargs["skip_tokenizer_init"] is True
    assert kwargs["backend"] == "pytorch" and kwargs["tensor_parallel_size"] == 1
    vocab = load_model_config(tiny_ckpt).vocab_size
    assert (d.world_size, d.max_seq_len, d.vocab_size) == (1, 2048, vocab)
    assert option_problems({k: v for k, v in kwargs.items() if k != "skip_tokenizer_init"}) == []


def test_sampling_kwargs_map_ours_to_tensorrt_llm():
    greedy = sampling_kwargs(SamplingParams(max_new_tokens=5, seed=3), (7, 9))
    assert greedy == {
        "max_tokens": 5,
        "end_id": 7,
        "stop_token_ids": [7, 9],
        "detokenize": False,
        "seed": 3,
        "top_k": 1,
        "top_p": None,
        "temperature": None,
    }
    sampled = sampling_kwargs(SamplingParams(temperature=0.6, top_p=0.9), ())
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.6, 0.9, None)
    assert sampled["end_id"] == -1 and sampled["stop_token_ids"] == []
    fields = set(pinned_fields()["classes"]["SamplingParams"])
    assert set(greedy) <= fields and set(sampled) <= fields


def test_generate_refuses_constraints_and_bad_prompts_before_submitting():
    """requests.unconstrained_batch: the refusals come before the LLM is touched (it is None)."""
    d = SimpleNamespace(world_size=1, max_batch_size=2, max_input_len=4, max_seq_len=8,
                        vocab_size=10, eos_token_id=1)  # fmt: skip
    engine = LlmApiEngine(d, llm=None, rank=0, tokenizer=None)
    with pytest.raises(UserError, match="constrained decoding is not available on the LLM API"):
        engine.generate([[1, 2]], constraints=[object()])
    with pytest.raises(UserError, match="prompt 0 has 5 tokens"):
        engine.generate([[1, 2, 3, 4, 5]], constraints=[None])
    with pytest.raises(UserError, match="2 sampling params for 1 prompts"):
        engine.generate([[1]], [SamplingParams(), SamplingParams()])


def test_tensorrt_llm_accepts_the_options(tiny_ckpt, tmp_path):
    problem = tensorrt_llm_problem()
    if problem is not None:
        pytest.skip(f"TensorRT-LLM's own TorchLlmArgs check needs it: {problem}")
    from kimi_trt.runtime.llmapi_backend import check_with_tensorrt_llm

    check_with_tensorrt_llm(_llmapi_dir(tmp_path, tiny_ckpt))


def test_the_api_front_end_speaks_the_llmapi_repositorys_interface(tiny_ckpt, tmp_path):
    """`kimi-trt serve --triton` over an llmapi repository: model tensorrt_llm, unbatched
    `kimi` inputs, every one declared in the repository's config.pbtxt (Triton's schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from kimi_trt.chat.tokenizer import KimiTokenizer
    from kimi_trt.serving.backends import TritonBackend
    from kimi_trt.serving.repo_spec import summarize_engine
    from kimi_trt.serving.triton_repo import write_triton_repo

    engine = _llmapi_dir(tmp_path, tiny_ckpt)
    summary = summarize_engine(engine)
    assert summary.kind == "llmapi" and summary.world_size == 1
    write_triton_repo(engine, tmp_path / "repo")
    pbtxt = (tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    config = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    declared = {i.name: list(i.dims) for i in config.input}
    backend = TritonBackend("127.0.0.1:1", summary, KimiTokenizer.from_dir(engine))
    assert backend.model == "tensorrt_llm" and not backend.batched
    sent = backend._inputs([1, 2, 3], SamplingParams(max_new_tokens=4, seed=1))
    for tensor in sent:
        assert tensor.name() in declared, tensor.name()
        assert len(tensor.shape()) == len(declared[tensor.name()])
