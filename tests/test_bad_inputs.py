"""The bad-input corpus of issue 21 (checkpoints and CLI): each case breaks one input of one
command - a safetensors header, an index entry, a config size, an output path, a rank
file, a run input - and must end in exactly one line on stderr, exit 2, no traceback, and
nothing half-written that looks complete (no manifest, index, repository, `*.tmp` or
`*.partial` left behind). Cases run in-process through click, so a regression shows the
real exception; a 120 s timeout guards the FIFO cases against a reader that blocks."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kimi_trt.checksum import manifest_algorithm
from kimi_trt.cli import main
from kimi_trt.runtime import sampling
from tests import bad_inputs_support as bad
from tests.bad_inputs_support import INDEX, LAYER1
from tests.runtime_support import converted

# ---- one environment per case: fresh copies made on first use ----------------------------


@dataclass
class Env:
    tmp: Path
    hf_src: Path
    rank_src: Path

    @cached_property
    def hf(self) -> Path:
        return Path(shutil.copytree(self.hf_src, self.tmp / "hf"))

    @cached_property
    def ranks(self) -> Path:
        return Path(shutil.copytree(self.rank_src, self.tmp / "ranks"))

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def a_file(self) -> Path:
        p = self.tmp / "plain-file"
        p.write_text("x")
        return p

    def build_yaml(self, **changes) -> Path:
        cfg = {
            "checkpoint": str(self.hf),
            "output_dir": str(self.out),
            "gpu": "cpu",
            "backend": "torch",
            "kv_cache_dtype": "fp32",
            "limits": {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128},
        }
        cfg.update(changes)
        p = self.tmp / "build.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p


@pytest.fixture(scope="module")
def rank_src(tiny_ckpt, tmp_path_factory) -> Path:
    return converted(tiny_ckpt, tmp_path_factory.mktemp("bad-inputs"), "w1")


# ---- the corpus -------------------------------------------------------------------------
# Header malformations: (id, surgery on one safetensors file, fragment of the message).
HEADERS: list[tuple[str, Callable[[Path], None], str]] = [
    ("header-is-a-list", lambda p: bad.edit_header(p, lambda h: [h]), "a JSON list"),
    (
        "entry-without-data_offsets",
        lambda p: bad.edit_header(p, bad.set_entry(bad.first, data_offsets=None)),
        "exactly dtype, shape, data_offsets",
    ),
    (
        "string-offsets",
        lambda p: bad.edit_header(
            p, bad.set_entry(bad.first, data_offsets=lambda e: [str(x) for x in e["data_offsets"]])
        ),
        "data_offsets must be",
    ),
    (
        "nested-10000-deep",
        lambda p: bad.write_raw(p, bad.deep_json(), bad.split(p)[1]),
        "nested too deeply",
    ),
    ("overlapping-offsets", lambda p: bad.edit_header(p, bad.overlap), "overlaps tensor"),
    (
        "start-after-end",
        lambda p: bad.edit_header(
            p, bad.set_entry(bad.first, data_offsets=lambda e: e["data_offsets"][::-1])
        ),
        "end before they start",
    ),
    (
        "offsets-into-the-header",
        lambda p: bad.edit_header(
            p, bad.set_entry(bad.first, data_offsets=lambda e: [x - 64 for x in e["data_offsets"]])
        ),
        "non-negative integers",
    ),
    (
        "offsets-shorter-than-shape",
        lambda p: bad.edit_header(
            p, bad.set_entry(bad.first, shape=lambda e: [e["shape"][0] + 1, *e["shape"][1:]])
        ),
        "needs",
    ),
    (
        "unknown-dtype",
        lambda p: bad.edit_header(p, bad.set_entry(bad.first, dtype="F4")),
        "unknown safetensors dtype",
    ),
    (
        "header-length-2^63",
        lambda p: bad.write_raw(p, b"{}", bad.split(p)[1], length=2**63),
        "claims",
    ),
    (
        "header-not-utf8",
        lambda p: bad.write_raw(p, b'{"\xff": 1}', bad.split(p)[1]),
        "not UTF-8",
    ),
    ("trailing-bytes", lambda p: p.write_bytes(p.read_bytes() + bytes(64)), "after the last"),
]
HEADER_SUBSET = ("header-is-a-list", "nested-10000-deep", "overlapping-offsets", "unknown-dtype")


def _hf_header(surgery) -> Callable[[Env], Path]:
    def make(env: Env) -> Path:
        surgery(env.hf / LAYER1)
        return env.hf

    return make


def _rank_header(surgery) -> Callable[[Env], Path]:
    def make(env: Env) -> Path:
        surgery(env.ranks / "rank0.safetensors")
        bad.reseal(env.ranks)
        return env.ranks

    return make


def _fifo(env: Env) -> None:
    os.mkfifo(env.hf / "fifo.safetensors")
    bad.point_shard(env.hf, "fifo.safetensors")


def _dir_shard(env: Env) -> None:
    (env.hf / "sub.safetensors").mkdir()
    bad.point_shard(env.hf, "sub.safetensors")


def _link_to_zero(env: Env) -> None:
    (env.hf / "zero.safetensors").symlink_to("/dev/zero")
    bad.point_shard(env.hf, "zero.safetensors")


def _no_index_fifo(env: Env) -> None:
    (env.hf / INDEX).unlink()
    os.mkfifo(env.hf / "model-fifo.safetensors")


INDEXES: list[tuple[str, Callable[[Env], None], str]] = [
    (
        "index-value-an-int",
        lambda env: bad.set_weight_map(env.hf, lambda wm: {**wm, next(iter(wm)): 5}),
        "must be a shard file name",
    ),
    (
        "weight_map-a-list",
        lambda env: bad.set_weight_map(env.hf, list),
        "no 'weight_map' object",
    ),
    ("shard-a-directory", _dir_shard, "is a directory"),
    (
        "shard-../../etc/passwd",
        lambda env: bad.point_shard(env.hf, "../../etc/passwd"),
        "outside the checkpoint directory",
    ),
    (
        "shard-/dev/zero",
        lambda env: bad.point_shard(env.hf, "/dev/zero"),
        "outside the checkpoint directory",
    ),
    ("shard-a-fifo", _fifo, "not a regular file"),
    ("shard-a-link-to-/dev/zero", _link_to_zero, "not a regular file"),
    ("no-index-and-a-fifo", _no_index_fifo, "not a regular file"),
    (
        "index-nested-10000-deep",
        lambda env: (env.hf / INDEX).write_bytes(bad.deep_json()),
        "nested too deeply",
    ),
]
CONFIGS: list[tuple[str, dict | Callable[[Path], None], str]] = [
    ("layers-10^9", {"num_hidden_layers": 10**9}, "num_hidden_layers"),
    (
        "layers-x-experts",
        {"num_hidden_layers": 1000, "n_routed_experts": 16384, "num_experts_per_tok": 8},
        "num_hidden_layers x n_routed_experts",
    ),
    ("vocab-2^40", {"vocab_size": 2**40}, "vocab_size"),
    ("hidden-size-a-string", {"hidden_size": "7168"}, "'hidden_size' must be an integer"),
    ("rope-theta-nan", {"rope_theta": float("nan")}, "'rope_theta' must be a finite number"),
    ("tie-embeddings-a-string", {"tie_word_embeddings": "yes"}, "'tie_word_embeddings'"),
    ("quantization-config-a-list", {"quantization_config": [1]}, "'quantization_config'"),
    (
        "rope-factor-a-string",
        {"rope_scaling": {"type": "yarn", "factor": "x", "original_max_position_embeddings": 4}},
        "rope_scaling values must be numbers",
    ),
    ("config-not-utf8", lambda p: p.write_bytes(b'{"a": "\xff"}'), "not UTF-8"),
    ("config-nested-10000-deep", lambda p: p.write_bytes(bad.deep_json()), "nested too deeply"),
]


def _config(change) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        if callable(change):
            change(env.hf / "config.json")
        else:
            bad.set_config(env.hf, **change)

    return apply


def _convert(make_ckpt) -> Callable[[Env], list[str]]:
    return lambda env: [
        "convert",
        "--quiet",
        "--checkpoint",
        str(make_ckpt(env)),
        "--out",
        str(env.out),
    ]


def _inspect(make_path) -> Callable[[Env], list[str]]:
    return lambda env: ["inspect", str(make_path(env))]


def _build(make_ckpt) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        make_ckpt(env)
        return ["build", "--config", str(env.build_yaml()), "--stop-after", "convert"]

    return argv


def _plan(change) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        _config(change)(env)
        return ["plan", "--config", str(env.build_yaml())]

    return argv


def _run(make_dir, *args: str) -> Callable[[Env], list[str]]:
    return lambda env: ["run", "--engine-dir", str(make_dir(env)), "--prompt-ids", "1,2", *args]


def _verify(make_dir) -> Callable[[Env], list[str]]:
    return lambda env: ["convert", "--out", str(make_dir(env)), "--verify"]


def _then(apply, result):
    """`apply(env)` for its effect, then `result(env)`: one make function of two steps."""
    return lambda env: (apply(env), result(env))[1]


def _ranks_with(edit) -> Callable[[Env], Path]:
    return _then(lambda env: edit(env.ranks), lambda env: env.ranks)


def _manifest(edit) -> Callable[[Env], Path]:
    return _ranks_with(lambda d: bad.edit_json(d / "manifest.json", edit))


def _files_list(m: dict) -> dict:
    return {**m, "files": list(m["files"])}


def _outside(m: dict) -> dict:
    entry = {"bytes": 1, manifest_algorithm(m): "0"}
    return {**m, "files": {**m["files"], "../../etc/passwd": entry}}


def _no_digest(m: dict) -> dict:
    m["files"]["rank0.safetensors"].pop(manifest_algorithm(m))
    return m


def _input_file(env: Env, text: bytes) -> list[str]:
    p = env.tmp / "in.jsonl"
    p.write_bytes(text)
    return ["run", "--engine-dir", str(env.ranks), "--tokenizer-dir", str(env.hf_src)] + [
        "--input-file",
        str(p),
    ]


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _line(obj) -> Callable[[Env], list[str]]:
    return lambda env: _input_file(env, json.dumps(obj).encode() + b"\n")


def _out_paths(command: Callable[[Env, Path], list[str]]) -> list[tuple[str, Callable, str]]:
    """Output path cases of one command: parent is a file, under /proc, read-only."""
    cases = [
        ("out-parent-is-a-file", lambda env: command(env, env.a_file() / "out"), "plain-file"),
        ("out-under-/proc", lambda env: command(env, Path("/proc/kimi-trt-test/out")), "/proc"),
    ]
    if os.geteuid() != 0:  # root writes into read-only directories

        def read_only(env: Env) -> list[str]:
            ro = env.tmp / "ro"
            ro.mkdir()
            ro.chmod(0o555)
            return command(env, ro / "out")

        cases.append(("out-read-only", read_only, "ro"))
    return cases


CORPUS: list[tuple[str, str, Callable[[Env], list[str]], str]] = []
for hid, surgery, frag in HEADERS:
    CORPUS.append(("convert", hid, _convert(_hf_header(surgery)), frag))
    CORPUS.append(("run", hid, _run(_rank_header(surgery)), frag))
    if hid in HEADER_SUBSET:
        CORPUS.append(("inspect", hid, _inspect(_hf_header(surgery)), frag))
        CORPUS.append(("inspect", "rank-" + hid, _inspect(_rank_header(surgery)), frag))
        CORPUS.append(("build", hid, _build(_hf_header(surgery)), frag))
        CORPUS.append(("convert", "verify-" + hid, _verify(_rank_header(surgery)), frag))
for iid, change, frag in INDEXES:
    make = _then(change, lambda env: env.hf)
    CORPUS += [("convert", iid, _convert(make), frag), ("inspect", iid, _inspect(make), frag)]
    if iid in ("shard-a-fifo", "shard-../../etc/passwd"):
        CORPUS.append(("build", iid, _build(make), frag))
for cid, change, frag in CONFIGS:
    make = _then(_config(change), lambda env: env.hf)
    CORPUS += [("convert", cid, _convert(make), frag), ("inspect", cid, _inspect(make), frag)]
    CORPUS += [("plan", cid, _plan(change), frag), ("build", cid, _build(make), frag)]
CORPUS += [
    (
        "plan",
        "yaml-not-utf8",
        lambda env: ["plan", "--config", str(_written(env.tmp / "b.yaml", b"gpu: \xff\n"))],
        "not UTF-8",
    ),
    (
        "plan",
        "yaml-nested-10000-deep",
        lambda env: ["plan", "--config", str(_written(env.tmp / "b.yaml", bad.deep_json()))],
        "nested too deeply",
    ),
    (
        "synth",
        "layers-10^9",
        lambda env: ["synth", "--layers", str(10**9), "--out", str(env.out)],
        "num_hidden_layers",
    ),
    (
        "synth",
        "set-vocab-2^40",
        lambda env: ["synth", "--set", f"vocab_size={2**40}", "--out", str(env.out)],
        "vocab_size",
    ),
    (
        "run",
        "rank-file-flipped-byte",
        _run(_ranks_with(lambda d: bad.flip_byte(d / "rank0.safetensors"))),
        "does not match the manifest",
    ),
    (
        "run",
        "rank-file-truncated",
        _run(_ranks_with(lambda d: os.truncate(d / "rank0.safetensors", 4096))),
        "bytes but the manifest records",
    ),
    ("run", "manifest-files-a-list", _run(_manifest(_files_list)), "no 'files' object"),
    (
        "run",
        "manifest-not-json",
        _run(_ranks_with(lambda d: (d / "manifest.json").write_text("{"))),
        "malformed JSON",
    ),
    (
        "convert",
        "verify-flipped-byte",
        _verify(_ranks_with(lambda d: bad.flip_byte(d / "rank0.safetensors"))),
        "does not match manifest.json",
    ),
    (
        "convert",
        "verify-manifest-files-a-list",
        _verify(_manifest(_files_list)),
        "no 'files' object",
    ),
    (
        "convert",
        "verify-manifest-entry-outside",
        _verify(_manifest(_outside)),
        "outside the directory",
    ),
    (
        "convert",
        "verify-manifest-entry-without-digest",
        _verify(_manifest(_no_digest)),
        "malformed entry",
    ),
    (
        "convert",
        "verify-manifest-not-utf8",
        _verify(_ranks_with(lambda d: (d / "manifest.json").write_bytes(b"\xff"))),
        "not UTF-8",
    ),
    (
        "inspect",
        "rank-manifest-files-a-list",
        _inspect(_manifest(_files_list)),
        "no 'files' object",
    ),
    (
        "run",
        "input-not-utf8",
        lambda env: _input_file(env, b'{"prompt": "a"}\n\xff\xfe\n'),
        ":2: not UTF-8",
    ),
    (
        "run",
        "input-content-42",
        _line({"messages": [{"role": "user", "content": 42}]}),
        "'content' must be",
    ),
    (
        "run",
        "input-content-list-of-junk",
        _line({"messages": [{"role": "user", "content": [1, None, "x"]}]}),
        "'content' must be",
    ),
    (
        "run",
        "input-content-an-object",
        _line({"messages": [{"role": "user", "content": {"a": 1}}]}),
        "'content' must be",
    ),
    ("run", "input-prompt-42", _line({"prompt": 42}), "'prompt' must be a string"),
    ("run", "input-chat-a-list", _line({"chat": ["a"]}), "'chat' must be a string"),
    (
        "run",
        "input-messages-a-string",
        _line({"messages": "hi"}),
        "'messages' must be a non-empty list",
    ),
    (
        "run",
        "input-tool-call-without-name",
        _line({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}),
        "'tool_calls' must be",
    ),
    (
        "run",
        "input-prompt-ids-bools",
        _line({"prompt_ids": [True, False]}),
        "'prompt_ids' must be a list of integers",
    ),
    (
        "run",
        "input-nested-10000-deep",
        lambda env: _input_file(env, bad.deep_json() + b"\n"),
        "nested too deeply",
    ),
    (
        "run",
        "input-a-directory",
        lambda env: ["run", "--engine-dir", str(env.ranks), "--input-file", str(env.tmp)],
        "cannot read input file",
    ),
]


def _tokenizer(edit) -> Callable[[Env], list[str]]:
    """`run --chat` with a tokenizer dir (a copy of the checkpoint's) broken by `edit`."""

    def argv(env: Env) -> list[str]:
        edit(env.hf)
        tokenizer = str(env.hf)
        return ["run", "--engine-dir", str(env.ranks), "--tokenizer-dir", tokenizer, "--chat", "hi"]

    return argv


CORPUS += [
    (
        "run",
        "tokenizer-config-nested-10000-deep",
        _tokenizer(lambda d: (d / "tokenizer_config.json").write_bytes(bad.deep_json())),
        "tokenizer_config.json: malformed JSON (nested too deeply)",
    ),
    (
        "run",
        "tokenizer-added-tokens-a-list",
        _tokenizer(
            lambda d: bad.edit_json(
                d / "tokenizer_config.json", lambda c: {**c, "added_tokens_decoder": [1]}
            )
        ),
        "'added_tokens_decoder' must be an object",
    ),
    (
        "run",
        "tokenizer-chat-template-not-utf8",
        _tokenizer(lambda d: (d / "chat_template.jinja").write_bytes(b"\xff")),
        "chat_template.jinja: not UTF-8",
    ),
]


for oid, make, frag in _out_paths(
    lambda env, out: ["convert", "--quiet", "--checkpoint", str(env.hf_src), "--out", str(out)]
):
    CORPUS.append(("convert", oid, make, frag))
for oid, make, frag in _out_paths(lambda env, out: ["synth", "--quiet", "--out", str(out)]):
    CORPUS.append(("synth", oid, make, frag))
for oid, make, frag in _out_paths(
    lambda env, out: [
        "build",
        "--config",
        str(env.build_yaml(output_dir=str(out))),
        "--stop-after",
        "plan",
    ]
):
    CORPUS.append(("build", oid, make, frag))
for oid, make, frag in _out_paths(
    lambda env, out: ["triton-repo", "--engine-dir", str(env.ranks), "--out", str(out)]
):
    CORPUS.append(("triton-repo", oid, make, frag))


def _leftovers(root: Path) -> list[str]:
    """What a failed command must not leave: temp files, partial dirs, completion markers
    in the output dir."""
    found = [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    out = root / "out"
    for marker in ("manifest.json", INDEX, "config.pbtxt"):
        found += [str(p) for p in out.rglob(marker)] if out.is_dir() else []
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "command,make,fragment",
    [pytest.param(c, m, f, id=f"{c}:{i}") for c, i, m, f in CORPUS],
)
def test_bad_input_is_one_line_exit_2(command, make, fragment, tiny_ckpt, rank_src, tmp_path):
    env = Env(tmp_path, tiny_ckpt, rank_src)
    argv = make(env)
    assert argv[0] == command
    result = CliRunner().invoke(main, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # show the real traceback of a regression
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    if command == "build":  # logs its stages to stderr: the error is its last line
        lines = [line for line in lines if not line.startswith(("[", "  "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output + result.stderr
    assert _leftovers(tmp_path) == []


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not hasattr(sampling, "SamplingError"),
    reason="needs numerically safe sampling (issue 21 items 1/15: runtime/sampling.py, issue-21a)",
)
@pytest.mark.parametrize(
    "args",
    [
        ["--temperature", "1e-40"],
        ["--temperature", "1", "--top-p", "1e-300"],
        ["--temperature", "1", "--seed", str(2**64)],
        ["--temperature", "5e-324", "--top-k", "3"],
    ],
    ids=["temperature-1e-40", "top-p-1e-300", "seed-2^64", "temperature-min-double"],
)
def test_run_sampling_extremes_never_traceback(args, rank_src):
    """Extreme sampling values either generate (numerically safe sampling) or are refused
    in one line; a traceback or NaN crash is the bug."""
    argv = ["run", "--engine-dir", str(rank_src), "--prompt-ids", "1,2", "--json", *args]
    result = CliRunner().invoke(main, [*argv, "--max-new-tokens", "3"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        assert len(json.loads(result.stdout)["tokens"]) == 3
    else:
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
