"""The checks behind the bad-input corpus, against independent references: headers the
safetensors library writes pass the validator with the offsets it reads; the NaN/Inf scan
counts what torch's isnan/isinf count, however the bytes are chunked; a conversion with
NaN weights or absurd scales warns (or fails under --strict, leaving no rank file); the
load-time checksum check is remembered only while the file is unchanged."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_trt.cli import main
from kimi_trt.config import model_config_from_dict
from kimi_trt.convert.rank_checkpoint import read_rank_config
from kimi_trt.convert.safetensors_header import read_safetensors_header
from kimi_trt.convert.weight_check import NonFiniteScan
from kimi_trt.errors import CheckpointError
from kimi_trt.runtime import integrity
from kimi_trt.runtime.weights import load_rank_weights
from tests.bad_inputs_support import LAYER1
from tests.conftest import K2_CONFIG
from tests.runtime_support import converted


def test_library_written_headers_validate_with_the_librarys_offsets(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp8": torch.randn(4, 3, generator=g).to(torch.float8_e4m3fn),  # 12 bytes: odd offsets
        "i64": torch.arange(3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header.metadata == {"format": "pt"}
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for name, entry in header.tensors.items():
            want = f.get_tensor(name)
            assert entry.dtype == f.get_slice(name).get_dtype() and entry.shape == tuple(want.shape)
            got = raw[header.data_start + entry.start : header.data_start + entry.end]
            assert got == want.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_kimi_k2_config_is_within_the_bounds():
    raw = json.loads(K2_CONFIG.read_text())
    assert model_config_from_dict(raw).num_hidden_layers == 61


@pytest.mark.parametrize(
    ("dtype", "st_dtype"),
    [
        (torch.float32, "F32"),
        (torch.bfloat16, "BF16"),
        (torch.float16, "F16"),
        (torch.float8_e4m3fn, "F8_E4M3"),
    ],
)
def test_scan_counts_what_torch_counts_across_any_chunking(dtype, st_dtype):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4099, generator=g)
    values[torch.randperm(4099, generator=g)[:37]] = float("nan")
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no Inf (it saturates to NaN)
        values[torch.randperm(4099, generator=g)[:11]] = float("-inf")
    t = values.to(dtype)
    want = int((torch.isnan(t.float()) | torch.isinf(t.float())).sum())
    data = memoryview(t.view(torch.uint8).numpy())
    cuts = sorted(set(np.random.default_rng(2).integers(1, len(data), 40).tolist()))
    scan = NonFiniteScan()
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):  # splits inside elements
        scan("w", st_dtype, data[a:b])
    assert want > 0 and scan.counts["w"] == want
    clean = NonFiniteScan()
    clean("w", st_dtype, memoryview(torch.randn(999).to(dtype).view(torch.uint8).numpy()))
    assert dict(clean.counts) == {}


def _poison(ckpt, nan_weight: bool = True, scale: float | None = None) -> None:
    """NaN bytes in one expert's FP8 weight and/or a huge block scale in layer 1's shard."""
    path = ckpt / LAYER1
    tensors = load_file(str(path))
    if nan_weight:
        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        w = tensors[name].view(torch.uint8).clone()
        w[5, 7], w[9, 1] = 0x7F, 0xFF  # both e4m3fn NaN codes
        tensors[name] = w.view(torch.float8_e4m3fn)
    if scale is not None:
        s = tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"].clone()
        s[0, 0] = scale
        tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"] = s
    save_file(tensors, str(path), metadata={"format": "pt"})


def _convert(ckpt, out, *extra):
    return CliRunner().invoke(
        main, ["convert", "--quiet", "--checkpoint", str(ckpt), "--out", str(out), *extra]
    )


def test_nan_weights_warn_and_strict_refuses(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    _poison(ckpt)
    out = tmp_path / "out"
    strict = _convert(ckpt, out, "--strict")
    assert strict.exit_code == 2, strict.stderr
    assert "transformer.layers.1.mlp.fc.weight" in strict.stderr and "--strict" in strict.stderr
    assert not list(out.glob("rank*")) and not (out / "manifest.json").exists()
    ok = _convert(ckpt, out)
    assert ok.exit_code == 0, ok.stderr
    warnings = [line for line in ok.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "holds 2 NaN/Inf values" in warnings[0]
    assert "model.layers.1.mlp.experts.{E}.up_proj" in warnings[0]
    reused = _convert(ckpt, out, "--strict")  # the rank file is reused: still refused
    assert reused.exit_code == 2 and "holds 2 NaN/Inf" in reused.stderr


def test_absurd_scale_warns_and_strict_refuses(tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    _poison(ckpt, nan_weight=False, scale=1e6)
    strict = _convert(ckpt, tmp_path / "a", "--strict")
    assert strict.exit_code == 2 and "o_proj.weight_scale_inv has scale 1e+06" in strict.stderr
    ok = _convert(ckpt, tmp_path / "b")
    assert ok.exit_code == 0 and "beyond any trained model" in ok.stderr


def test_clean_checkpoint_converts_without_warnings(tiny_ckpt, tmp_path):
    result = _convert(tiny_ckpt, tmp_path / "out", "--strict")
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_load_check_is_remembered_until_the_file_changes(tiny_ckpt, tmp_path, monkeypatch):
    ranks = shutil.copytree(converted(tiny_ckpt, tmp_path, "w1"), tmp_path / "ranks")
    cfg = read_rank_config(ranks)
    hashed: list[str] = []
    real = integrity.hash_file

    def counting(path, algorithm):
        hashed.append(path.name)
        return real(path, algorithm)

    monkeypatch.setattr(integrity, "hash_file", counting)

    def load():
        load_rank_weights(cfg, 0, torch.float32, torch.device("cpu"))

    load()
    load()
    assert hashed == ["rank0.safetensors"]  # the second load only stats the file
    st = os.stat(ranks / "rank0.safetensors")
    os.utime(ranks / "rank0.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    load()
    assert len(hashed) == 2  # a changed mtime (or ctime, inode, size) hashes again
    cache = ranks / integrity.CACHE_DIR
    shutil.rmtree(cache)
    cache.write_text("")  # nowhere to remember (as in a read-only dir): verified every load
    load()
    load()
    assert len(hashed) == 4
    cache.unlink()
    load()  # remembered again
    with open(ranks / "rank0.safetensors", "r+b") as f:  # same size, same mtime restored
        f.seek(-100, 2)
        f.write(b"\x00")
    os.utime(ranks / "rank0.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load()  # ctime changed with the write: the remembered check no longer applies
