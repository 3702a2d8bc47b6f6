"""StreamingSafetensorsWriter: direct (O_DIRECT, staged) and buffered writes give the same
file, readable by the official `safetensors` loader, with the sha256 it reports.

Parts are tensors and `FileSlice`s (verbatim byte ranges of another file), sized so that
tensors straddle staging-buffer boundaries and the file ends on an unaligned tail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimi_trt.convert.safetensors_io import (
    STAGE_BYTES,
    FileSlice,
    StreamingSafetensorsWriter,
    TensorSpec,
    sha256_file,
)
from kimi_trt.errors import CheckpointError


def _source(tmp: Path) -> tuple[Path, torch.Tensor]:
    data = torch.randint(0, 256, (3 * STAGE_BYTES + 12345,), dtype=torch.uint8)
    path = tmp / "source.bin"
    path.write_bytes(b"\x07" * 100 + data.numpy().tobytes())
    return path, data


def _write(out: Path, src: Path, direct: bool) -> str:
    big = STAGE_BYTES + 4099  # crosses a staging boundary, not a multiple of the alignment
    specs = [
        TensorSpec("a", torch.float32, (3, 5)),
        TensorSpec("b", torch.uint8, (2 * big,)),
        TensorSpec("c", torch.bfloat16, (7,)),
    ]
    with StreamingSafetensorsWriter(out, specs, {"k": "v"}, direct=direct) as w:
        w.write("a", torch.arange(15, dtype=torch.float32).reshape(3, 5))
        first = FileSlice(src, 100, big, torch.uint8, (big,))
        w.write_parts("b", [first, torch.full((big,), 9, dtype=torch.uint8)])
        w.write("c", torch.ones(7, dtype=torch.bfloat16))
        return w.close()


def _targets(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    shm = Path("/dev/shm")  # tmpfs: O_DIRECT may be refused -> buffered fallback
    if shm.is_dir() and os.access(shm, os.W_OK):
        dirs.append(shm)
    return dirs


@pytest.mark.parametrize("direct", [False, True])
def test_writer_modes_identical(tmp_path, direct):
    src, data = _source(tmp_path)
    reference = tmp_path / "reference.safetensors"
    _write(reference, src, direct=False)
    for d in _targets(tmp_path):
        out = d / f"kimi_test_{os.getpid()}_{direct}.safetensors"
        try:
            sha = _write(out, src, direct)
            assert sha == sha256_file(out)
            assert out.read_bytes() == reference.read_bytes()
            got = load_file(out)
            big = STAGE_BYTES + 4099
            assert torch.equal(got["b"][:big], data[:big])
            assert torch.equal(got["b"][big:], torch.full((big,), 9, dtype=torch.uint8))
            assert torch.equal(got["a"], torch.arange(15, dtype=torch.float32).reshape(3, 5))
        finally:
            out.unlink(missing_ok=True)


def test_truncated_slice_source_is_one_line_error(tmp_path):
    src, _ = _source(tmp_path)
    os.truncate(src, 1000)
    with pytest.raises(CheckpointError, match=r"source\.bin: unexpected end of file at byte 1000"):
        _write(tmp_path / "x.safetensors", src, direct=True)
    assert not (tmp_path / "x.safetensors").exists()
    assert not (tmp_path / "x.safetensors.tmp").exists()
