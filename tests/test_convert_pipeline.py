"""The converter's runtime shape: no torch at convert time, checksums readers can trust
(new XXH3-128 manifests and older sha256 ones), and the numpy <-> torch bridge the
executors use to read what the converter wrote."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kimi_trt.convert import dtypes
from kimi_trt.convert.manifest import verify_dir
from kimi_trt.errors import CheckpointError
from kimi_trt.torch_bridge import to_numpy, to_torch
from tests.conftest import REPO, cli_env

# Runs `kimi-trt convert` in-process, then reports which heavy modules were imported.
NO_TORCH = """
import sys
from kimi_trt.cli import main
try:
    main(["convert", "--quiet", "--checkpoint", sys.argv[1], "--out", sys.argv[2], "--tp", "2"])
except SystemExit as e:
    assert not e.code, e.code
print(sorted(m for m in ("torch", "safetensors.torch", "transformers") if m in sys.modules))
"""


def test_convert_never_imports_torch(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tiny_ckpt), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "manifest.json").is_file()


def test_verify_reads_legacy_sha256_manifests(tiny_ckpt, tmp_path):
    """A format_version 1 manifest (sha256 digests, no checksum_algorithm) still verifies,
    and a flipped byte is still caught."""
    out = tmp_path / "out"
    from kimi_trt.cli import main

    with pytest.raises(SystemExit) as done:
        main(["convert", "--quiet", "--checkpoint", str(tiny_ckpt), "--out", str(out)])
    assert done.value.code == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["checksum_algorithm"] == "xxh3_128" and manifest["format_version"] == 2
    del manifest["checksum_algorithm"]
    manifest["format_version"] = 1
    for name, entry in manifest["files"].items():
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
    verify_dir(out)
    with open(out / "rank0.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="rank0.safetensors: sha256 checksum does not match"):
        verify_dir(out)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.float16]
)
def test_torch_bridge_round_trip(dtype):
    t = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    a = to_numpy(t)
    assert a.shape == (5, 7) and a.tobytes() == t.view(torch.uint8).numpy().tobytes()
    assert (
        a.dtype
        == {
            torch.float32: dtypes.float32,
            torch.bfloat16: dtypes.bfloat16,
            torch.float8_e4m3fn: dtypes.float8_e4m3fn,
            torch.int8: dtypes.int8,
            torch.float16: dtypes.float16,
        }[dtype]
    )
    back = to_torch(a)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    if dtype != torch.int8:
        assert np.array_equal(a.astype(np.float32), t.float().numpy())
