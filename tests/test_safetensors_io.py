"""StreamingSafetensorsWriter: direct (O_DIRECT, staged) and buffered writes give the same
file, readable by the official `safetensors` loader, with the checksum that the `xxhash`
library computes over the finished file.

Parts are arrays and `FileSlice`s (verbatim byte ranges of another file), sized so that
tensors straddle staging-buffer boundaries, more buffers are filled than the pool holds
(the writer thread must hand them back) and the file ends on an unaligned tail.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import xxhash
from safetensors.numpy import load_file

from kimi_trt.convert import dtypes
from kimi_trt.convert.safetensors_io import (
    STAGE_BUFFERS,
    STAGE_BYTES,
    FileSlice,
    StreamingSafetensorsWriter,
    TensorSpec,
)
from kimi_trt.errors import CheckpointError

BIG = STAGE_BUFFERS * STAGE_BYTES // 2 + 4099  # two of them overflow the buffer pool


def _source(tmp: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 256, BIG + 12345, dtype=np.uint8)
    path = tmp / "source.bin"
    path.write_bytes(b"\x07" * 100 + data.tobytes())
    return path, data


def _write(out: Path, src: Path, direct: bool) -> str:
    specs = [
        TensorSpec("a", dtypes.float32, (3, 5)),
        TensorSpec("b", dtypes.uint8, (2 * BIG,)),
        TensorSpec("c", dtypes.bfloat16, (7,)),
    ]
    with StreamingSafetensorsWriter(out, specs, {"k": "v"}, direct=direct) as w:
        w.write("a", np.arange(15, dtype=np.float32).reshape(3, 5))
        first = FileSlice(src, 100, BIG, dtypes.uint8, (BIG,))
        w.write_parts("b", [first, np.full(BIG, 9, dtype=np.uint8)])
        w.write("c", np.ones(7, dtype=dtypes.bfloat16))
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
            digest = _write(out, src, direct)
            assert digest == xxhash.xxh3_128(out.read_bytes()).hexdigest()
            assert out.read_bytes() == reference.read_bytes()
            got = load_file(out)
            assert np.array_equal(got["b"][:BIG], data[:BIG])
            assert np.array_equal(got["b"][BIG:], np.full(BIG, 9, dtype=np.uint8))
            assert np.array_equal(got["a"], np.arange(15, dtype=np.float32).reshape(3, 5))
        finally:
            out.unlink(missing_ok=True)


def test_bfloat16_bytes_match_torch_layout(tmp_path):
    """ml_dtypes' bfloat16 is torch's: the same 2 bytes per value, read back by safetensors."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=ml_dtypes.bfloat16)
    out = tmp_path / "bf16.safetensors"
    with StreamingSafetensorsWriter(out, [TensorSpec("x", dtypes.bfloat16, (4,))]) as w:
        w.write("x", values)
    got = load_torch(out)["x"]
    assert got.dtype == torch.bfloat16
    assert got.tolist() == [1.0, -2.5, 3.140625, 0.0]


def test_truncated_slice_source_is_one_line_error(tmp_path):
    src, _ = _source(tmp_path)
    os.truncate(src, 1000)
    with pytest.raises(CheckpointError, match=r"source\.bin: unexpected end of file at byte 1000"):
        _write(tmp_path / "x.safetensors", src, direct=True)
    assert not (tmp_path / "x.safetensors").exists()
    assert not (tmp_path / "x.safetensors.tmp").exists()


def test_write_error_names_the_tensor_whose_bytes_failed(tmp_path):
    """A write refused on the writer thread surfaces in the filling thread as an OSError,
    and `failed_tensor` names the tensor at the failed offset (not the one being filled)."""
    src, _ = _source(tmp_path)
    out = tmp_path / "full.safetensors"
    specs = [TensorSpec("a", dtypes.uint8, (BIG,)), TensorSpec("b", dtypes.uint8, (4 * BIG,))]
    w = StreamingSafetensorsWriter(out, specs, direct=True)
    os.close(w._out.fd)  # every later write fails with EBADF
    w._out.fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(OSError), w:
        w.write_parts("a", [FileSlice(src, 100, BIG, dtypes.uint8, (BIG,))])
        w.write_parts("b", [np.zeros(4 * BIG, dtype=np.uint8)])
        w.close()
    assert w.failed_tensor == "a"
    assert not out.exists() and not w.tmp.exists()
