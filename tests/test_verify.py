"""`kimi-trt verify`: its shipped references are transformers' (regenerated and compared
here so they cannot go stale); it passes on the tiny model's torch engine dirs (one rank, TP2
and EP2 under a real mpirun) and fails - exit 1, the table naming the file and the prompts -
on a dir whose rank file was altered. Every file verify reads (the engine dir's config.json
and manifest.json, the shipped references) that is malformed or wrong-shaped is one line
naming it and the key or tensor, exit 2."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kimi_trt.errors import CheckpointError, ConfigError
from kimi_trt.testing.verify_reference import TINY, build_references
from kimi_trt.verify import REFERENCES, load_references
from tests import bad_inputs_support as bad
from tests.conftest import VENV_BIN
from tests.runtime_support import mpi_env
from tests.test_build import write_config

KIMI = str(VENV_BIN / "kimi-trt")


def test_shipped_references_are_what_transformers_computes():
    cases, meta = load_references()
    tensors, fresh = build_references(TINY, meta["steps"])
    assert fresh == meta
    for i, case in enumerate(cases):
        assert tensors[f"{i}.prompt"].tolist() == case.prompt
        assert tensors[f"{i}.tokens"].tolist() == case.tokens
        assert torch.allclose(tensors[f"{i}.logits"], case.logits, rtol=0, atol=1e-5)
    assert REFERENCES.with_suffix(".safetensors").stat().st_size < 1 << 20  # compact


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny model built with the shipped tiny configs, plus a one-rank build."""
    from kimi_trt.build import run_build

    out = {}
    for name, base, changes in (
        ("w1", "tiny_cpu_tp2", {"parallelism": {"tp": 1, "ep": 1, "moe_tp": 1}}),
        ("tp2", "tiny_cpu_tp2", {}),
        ("ep2", "tiny_cpu_ep2", {}),
    ):
        tmp = tmp_path_factory.mktemp(f"verify_{name}")
        run_build(write_config(tmp, base, TINY, **changes), log=lambda s: None)
        out[name] = tmp / "engine"
    return out


def verify(engine: Path, ranks: int) -> subprocess.CompletedProcess:
    cmd = [KIMI, "verify", "--engine-dir", str(engine)]
    if ranks > 1:
        cmd = [str(VENV_BIN / "mpirun"), "--oversubscribe", "-np", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=600)


@pytest.mark.mpi
@pytest.mark.parametrize("name, ranks", [("w1", 1), ("tp2", 2), ("ep2", 2)])
def test_verify_passes_on_the_tiny_models_torch_dirs(tiny_dirs, name, ranks):
    r = verify(tiny_dirs[name], ranks)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 7/7 checks passed" in r.stdout and f"{ranks} rank(s), fp32" in r.stdout
    assert r.stdout.count(" PASS  ") == 7 and " FAIL " not in r.stdout


@pytest.mark.mpi
def test_verify_fails_on_an_altered_rank_file(tiny_dirs, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_dirs["tp2"], engine)
    rank1 = engine / "rank1.safetensors"
    data = bytearray(rank1.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    for off in range(header, len(data), 97):  # scramble weights, keep the header and size
        data[off] ^= 0x5A
    rank1.unlink()  # a hard link to the build's checkpoint: replace, do not write through
    rank1.write_bytes(bytes(data))
    r = verify(engine, 2)
    assert r.returncode != 0, r.stdout
    rows = {line[:24].strip(): line[25:] for line in r.stdout.splitlines()}
    assert rows["file rank1.safetensors"].startswith("FAIL  xxh3_128 differs from manifest.json")
    assert "error: verify failed: file rank1.safetensors" in r.stderr
    assert r.stdout.count(" FAIL ") >= 2  # the file, and the logits it now computes


# ---- bad inputs: one line, exit 2, never a traceback ----------------------------------------


def _no_checkpoint(d: Path, config: bytes) -> None:
    """config.json replaced and the per-rank checkpoint removed: verify must read config.json."""
    import shutil

    shutil.rmtree(d / "checkpoint")
    (d / "config.json").write_bytes(config)


def _manifest_files(edit) -> Callable[[Path], None]:
    return lambda d: bad.edit_json(d / "manifest.json", lambda m: {**m, "files": edit(m["files"])})


VERIFY_BAD_DIRS = [
    ("manifest-files-a-list", _manifest_files(list), "no 'files' object"),
    (
        "manifest-entry-a-string",
        _manifest_files(lambda f: {**f, "config.json": "x"}),
        "malformed entry for config.json",
    ),
    (
        "manifest-entry-outside",
        _manifest_files(lambda f: {**f, "../../etc/passwd": {"bytes": 1, "xxh3_128": "0"}}),
        "lies outside the directory",
    ),
    ("manifest-not-json", lambda d: (d / "manifest.json").write_text("{"), "malformed JSON"),
    ("manifest-a-list", lambda d: (d / "manifest.json").write_text("[]"), "expected a JSON object"),
    (
        "manifest-nested-10000-deep",
        lambda d: (d / "manifest.json").write_bytes(bad.deep_json()),
        "nested too deeply",
    ),
    (
        "llmapi-config-without-hf_config",
        lambda d: _no_checkpoint(d, b'{"backend": "llmapi"}'),
        "config.json: no 'hf_config'",
    ),
    (
        "engine-config-not-utf8",
        lambda d: _no_checkpoint(d, b'{"a": "\xff"}'),
        "config.json: not UTF-8",
    ),
    (
        "engine-config-nested-10000-deep",
        lambda d: _no_checkpoint(d, bad.deep_json()),
        "config.json: malformed JSON (nested too deeply)",
    ),
    (
        "engine-config-hf_config-a-list",
        lambda d: _no_checkpoint(d, b'{"pretrained_config": {"kimi_trt": {"hf_config": []}}}'),
        "pretrained_config.kimi_trt.hf_config: expected a JSON object",
    ),
]


@pytest.mark.parametrize(
    "surgery, fragment", [pytest.param(s, f, id=i) for i, s, f in VERIFY_BAD_DIRS]
)
def test_verify_names_a_broken_engine_dir_file_in_one_line(tiny_dirs, tmp_path, surgery, fragment):
    """Every file verify reads from the engine dir: malformed, too deep or wrong-shaped is
    one line naming it (and the key), exit 2 - before anything loads or the table starts."""
    import shutil

    from click.testing import CliRunner

    from kimi_trt.cli import main

    engine = Path(shutil.copytree(tiny_dirs["w1"], tmp_path / "engine"))
    surgery(engine)
    result = CliRunner().invoke(main, ["verify", "--engine-dir", str(engine)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the real traceback of a regression
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {engine}"), lines
    assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""  # refused before the table


def _references(tmp_path: Path, meta=None, tensors=None) -> Path:
    """A copy of the shipped references with the provenance and/or tensors edited."""
    import json

    from safetensors.torch import load_file, save_file

    base = tmp_path / "refs"
    raw = json.loads(REFERENCES.with_suffix(".json").read_text())
    if isinstance(meta, bytes):
        base.with_suffix(".json").write_bytes(meta)
    else:
        base.with_suffix(".json").write_text(json.dumps(meta(raw) if meta else raw))
    t = load_file(str(REFERENCES.with_suffix(".safetensors")))
    save_file(tensors(t) if tensors else t, str(base.with_suffix(".safetensors")))
    return base


def _without(key: str):
    return lambda d: {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "meta, tensors, error, fragment",
    [
        (b"{", None, ConfigError, "refs.json: malformed JSON"),
        (bad.deep_json(), None, ConfigError, "refs.json: malformed JSON (nested too deeply)"),
        (lambda m: [m], None, ConfigError, "refs.json: expected a JSON object"),
        (_without("prompts"), None, ConfigError, "'prompts' must be an integer, got None"),
        (lambda m: {**m, "model_config_hash": 7}, None, ConfigError, "'model_config_hash' must"),
        (lambda m: {**m, "prompts": 0}, None, ConfigError, "must be at least 1"),
        (None, _without("2.logits"), CheckpointError, "tensor '2.logits' is missing"),
        (
            None,
            lambda t: {**t, "1.tokens": t["1.tokens"].float()},
            CheckpointError,
            "tensor '1.tokens' is F32 [12], expected I64 or I32 of rank 1",
        ),
        (
            None,
            lambda t: {**t, "0.logits": t["0.logits"][:5]},
            CheckpointError,
            "tensor '0.logits' has 5 rows, '0.tokens' 12 tokens",
        ),
    ],
    ids=[
        "json-malformed",
        "json-nested-10000-deep",
        "json-a-list",
        "json-without-prompts",
        "json-hash-an-int",
        "json-zero-prompts",
        "tensor-missing",
        "tokens-float",
        "logits-short",
    ],
)
def test_broken_references_are_one_line_naming_file_and_key(
    tmp_path, meta, tensors, error, fragment
):
    base = _references(tmp_path, meta, tensors)
    with pytest.raises(error) as e:
        load_references(base)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(base))


def test_a_corrupt_references_header_is_named_before_loading(tmp_path):
    """The safetensors header is validated (`safetensors_header`), not handed to load_file."""
    base = _references(tmp_path)
    bad.edit_header(base.with_suffix(".safetensors"), bad.overlap)
    with pytest.raises(CheckpointError, match=r"refs\.safetensors: tensor \S+ .* overlaps tensor"):
        load_references(base)
