"""Bad input to `kimi-trt convert`: exit 2, one line naming the file and tensor, nothing
left that looks complete (no manifest.json, no rank file from a failed rank)."""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from kimi_trt.cli import main
from tests.conftest import cli_env

LAYER0 = "model-00001-of-00003.safetensors"
LAYER1 = "model-00002-of-00003.safetensors"


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    """A private, editable copy of the tiny checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def run_convert(*args: str):
    return CliRunner().invoke(main, ["convert", "--quiet", *args])


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


def assert_not_complete(out: Path) -> None:
    assert not (out / "manifest.json").exists()


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_index(ckpt: Path, edit) -> None:
    p = ckpt / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    edit(index["weight_map"])
    p.write_text(json.dumps(index))


def test_truncated_shard(ckpt, tmp_path):
    shard = ckpt / LAYER1
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    out = tmp_path / "out"
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(out)), LAYER1, "truncated", "tensor"
    )
    assert_not_complete(out)


def test_shard_missing_from_disk(ckpt, tmp_path):
    (ckpt / LAYER1).unlink()
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")),
        LAYER1,
        "missing from disk",
        "model.layers.1.",
    )


def test_tensor_in_index_but_absent(ckpt, tmp_path):
    name = "model.layers.1.self_attn.q_a_layernorm.weight"
    rewrite_shard(ckpt / LAYER1, lambda t: t.pop(name))
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")), LAYER1, name, "absent"
    )


def test_missing_weight_scale_inv(ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    rewrite_shard(ckpt / LAYER1, lambda t: t.pop(name))
    edit_index(ckpt, lambda m: m.pop(name))
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")),
        name,
        "missing",
        "FP8 block scales",
    )


def test_scale_shape_mismatch(ckpt, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    rewrite_shard(ckpt / LAYER1, lambda t: t.update({name: torch.ones(3, 2)}))
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")),
        LAYER1,
        name,
        "[3, 2]",
        "[2, 4]",
        "[256, 512]",
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scales(ckpt, tmp_path, bad):
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"

    def poison(t):
        t[name][0, 1] = bad

    rewrite_shard(ckpt / LAYER0, poison)
    out = tmp_path / "o"
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(out)), LAYER0, name, "NaN/Inf"
    )
    assert not out.exists() or not any(out.iterdir())  # refused before writing anything


def test_wrong_dtype(ckpt, tmp_path):
    name = "model.layers.1.self_attn.q_b_proj.weight"
    rewrite_shard(ckpt / LAYER1, lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")),
        LAYER1,
        name,
        "BF16",
        "F8_E4M3",
    )


def test_config_tensor_shape_mismatch(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 2048
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_user_error(
        run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "o")),
        LAYER0,
        "model.layers.0.mlp.",
        "expected [",
        "config.json",
    )


def test_unknown_tensor_warns_or_fails_with_strict(ckpt, tmp_path):
    name = "model.layers.1.self_attn.extra_bias"
    rewrite_shard(ckpt / LAYER1, lambda t: t.update({name: torch.zeros(4)}))
    edit_index(ckpt, lambda m: m.update({name: LAYER1}))
    ok = run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "a"))
    assert ok.exit_code == 0, ok.output
    assert f"warning: 1 unknown tensor(s) ignored: {name}" in ok.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["source"]["unknown"] == [name]
    strict = run_convert("--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--strict")
    assert_user_error(strict, name, "--strict")


def test_output_dir_of_another_model(tiny_ckpt, tiny_groups_ckpt, tmp_path):
    out = tmp_path / "out"
    assert run_convert("--checkpoint", str(tiny_ckpt), "--out", str(out)).exit_code == 0
    other = run_convert("--checkpoint", str(tiny_groups_ckpt), "--out", str(out))
    assert_user_error(other, str(out / "config.json"), "different model")
    layout = run_convert("--checkpoint", str(tiny_ckpt), "--out", str(out), "--tp", "2")
    assert_user_error(layout, "different model, layout")
    hf_dir = run_convert("--checkpoint", str(tiny_ckpt), "--out", str(tiny_groups_ckpt))
    assert_user_error(hf_dir, "another model's files")


def test_bad_layout_and_format_options(tiny_ckpt, tmp_path):
    out = str(tmp_path / "o")
    assert_user_error(
        run_convert("--checkpoint", str(tiny_ckpt), "--out", out, "--tp", "16"),
        "num_attention_heads=8 is not divisible by 16",
        "n_routed_experts=8 is not divisible by 16",
    )
    assert_user_error(
        run_convert("--checkpoint", str(tiny_ckpt), "--out", out, "--tp", "4", "--ep", "3"),
        "--ep 3 must divide --tp 4",
    )
    assert_user_error(
        run_convert(
            "--checkpoint", str(tiny_ckpt), "--out", out, "--tp", "4", "--ep", "2", "--moe-tp", "1"
        ),
        "must equal tp (4)",
    )
    assert_user_error(
        run_convert("--checkpoint", str(tiny_ckpt), "--out", out, "--format", "experts=int4"),
        "experts",
        "int4",
    )
    assert_user_error(
        run_convert("--checkpoint", str(tiny_ckpt), "--out", out, "--format", "mlp=bf16"),
        "CLASS=FORMAT",
    )


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_output_disk_full(tiny_ckpt, tmp_path):
    """A 2 MB file-size limit (RLIMIT_FSIZE) stands in for a full disk: clean exit 2."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "kimi_trt.cli",
        "convert",
        "--quiet",
        "--checkpoint",
        str(tiny_ckpt),
        "--out",
        str(out),
        "--jobs",
        "1",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=cli_env(), preexec_fn=_limit_file_size, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        "rank0.safetensors: cannot write (File too large) while writing tensor transformer." in line
    )
    assert_not_complete(out)
    assert not list(out.glob("rank*.safetensors*"))


def test_verify_detects_corruption(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    assert (
        run_convert(
            "--checkpoint", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--verify"
        ).exit_code
        == 0
    )
    ok = run_convert("--out", str(out), "--verify")
    assert ok.exit_code == 0 and "verified" in ok.output
    with open(out / "rank1.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x01" * 10)
    assert_user_error(
        run_convert("--out", str(out), "--verify"), "rank1.safetensors", "xxh3_128 checksum"
    )
    assert_user_error(run_convert("--out", str(tmp_path / "nothing"), "--verify"), "manifest.json")
    assert_user_error(run_convert("--out", str(out)), "--checkpoint is required")
