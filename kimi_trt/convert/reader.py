"""Lazy reader of a Hugging Face checkpoint, validated against its config before any weight.

`HFCheckpoint.open` parses the index and every shard's safetensors header (a few KB per
file) and checks them against `hf_layout.hf_tensors(cfg)`: shards present, regular files
inside the checkpoint dir (an index naming `../../etc/passwd` or a FIFO is refused),
headers valid in full (`safetensors_header`: offsets tile the file, each span is shape x
dtype bytes), every expected tensor present with the right dtype and shape (FP8 scales
included), unknown tensors reported. `check_scales` then reads only the small FP8 scale
tensors and refuses NaN/Inf/non-positive values. Weights are read later, slice by slice,
with `os.preadv` straight into a numpy array at the offsets the header gives - never a whole
shard, never the whole model. (Not mmap/`safe_open`: every mapped page a process touches
counts toward its resident memory until unmapped, so RSS would grow with the model;
a pread leaves nothing behind but the page cache, and skips one copy.) The exception is a
column slice (a weight split by columns keeps 1/tp of each row): those rows are mapped a
few MB at a time and only the kept columns copied, instead of reading every row whole.
FP8 bytes stored verbatim (by whole rows) are not read here at all: `fp8_slice`/`raw_rows`
return their byte ranges (`FileSlice`) and the rank writer streams them file to file.
Everything else is read as values (`values`: dequantised float32, any slice bounds).
Every error is one line naming the file and the tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from kimi_trt.config import ModelConfig
from kimi_trt.convert.fp8 import FP8_MAX, dequantize_block
from kimi_trt.convert.hf_layout import HFTensor, hf_tensors
from kimi_trt.convert.safetensors_header import read_safetensors_header, require_regular_file
from kimi_trt.convert.safetensors_io import DTYPE_TO_ST, ST_TO_DTYPE, FileSlice
from kimi_trt.convert.weight_check import MAX_SCALE, MAX_WEIGHT_MAGNITUDE
from kimi_trt.convert.weight_table import consumed_sources, is_ignored
from kimi_trt.errors import CheckpointError
from kimi_trt.json_files import read_json

INDEX_NAME = "model.safetensors.index.json"
_MAX_LISTED = 5
_COL_CHUNK_BYTES = 16 << 20  # rows mapped at once when only some columns are kept


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    dtype: str  # safetensors dtype string, e.g. F8_E4M3
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute file offset of the tensor's first byte


def _listing(names: list[str]) -> str:
    head = ", ".join(names[:_MAX_LISTED])
    return head + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def read_header(path: Path, file: str | None = None) -> dict[str, SourceTensor]:
    """Tensors of one safetensors file (`file`: its name relative to the checkpoint) from
    its fully validated header (`safetensors_header`: offsets tile the file, sizes match)."""
    header = read_safetensors_header(path)
    return {
        name: SourceTensor(
            name, file or path.name, e.dtype, e.shape, e.nbytes, header.data_start + e.start
        )
        for name, e in header.tensors.items()
    }


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name (strings only)."""
    require_regular_file(index, "index")
    raw = read_json(index, CheckpointError)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed index (no 'weight_map' object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(
                f"{index}: weight_map entry {name!r} must be a shard file name, got {file!r:.60}"
            )
    return weight_map


def _check_shard(root: Path, file: str, weight_map: dict[str, str]) -> None:
    """A shard named by the index must lie inside the checkpoint dir and be a regular file:
    `../../etc/passwd`, `/dev/zero` or a FIFO are refused before anything is opened."""
    parts = PurePosixPath(file).parts
    if PurePosixPath(file).is_absolute() or ".." in parts or not parts:
        raise CheckpointError(
            f"{root / INDEX_NAME}: shard {file!r} lies outside the checkpoint directory "
            f"(tensor {next(n for n, f in weight_map.items() if f == file)})"
        )
    fp = root / file
    if not fp.exists():
        listed = sorted(n for n, f in weight_map.items() if f == file)
        raise CheckpointError(
            f"{fp}: shard listed in {INDEX_NAME} is missing from disk "
            f"(holds {len(listed)} tensors, e.g. {listed[0]})"
        )
    require_regular_file(fp, "shard file")


def read_weight_map(path: Path) -> dict[str, str]:
    """tensor name -> shard file (relative to `path`): from the index, else from the headers
    of every `*.safetensors` file. Every shard is checked by `_check_shard`."""
    index = path / INDEX_NAME
    if index.exists():
        weight_map = _read_index(index)
        for file in sorted(set(weight_map.values())):
            _check_shard(path, file, weight_map)
        return weight_map
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {INDEX_NAME} and no *.safetensors files")
    return {name: f for f in files for name in read_header(path / f)}


class HFCheckpoint:
    """A validated HF checkpoint: tensor table plus lazily opened, per-thread file handles."""

    def __init__(self, path: Path, model: ModelConfig, tensors: dict[str, SourceTensor]):
        self.path = path
        self.model = model
        self.tensors = tensors
        self.block = model.weight_block_size
        self._local = threading.local()

    @classmethod
    def open(cls, path: str | Path, model: ModelConfig) -> tuple[HFCheckpoint, list[str]]:
        """Validate headers against `model`; returns the reader and the unknown tensor names."""
        path = Path(path)
        weight_map = read_weight_map(path)
        headers = {f: read_header(path / f, f) for f in sorted(set(weight_map.values()))}
        tensors: dict[str, SourceTensor] = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(
                    f"{path / file}: tensor {name} is listed in {INDEX_NAME} but absent from the file"
                )
            tensors[name] = headers[file][name]
        unknown = _check_expected(path, model, tensors)
        return cls(path, model, tensors), unknown

    # ---- reading ---------------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = {}
        if file not in fds:
            fds[file] = os.open(self.path / file, os.O_RDONLY)
        return fds[file]

    def _pread_into(self, file: str, out: np.ndarray, offset: int) -> None:
        """Fill contiguous `out` with the file's bytes at `offset` (short reads retried)."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd, done = self._fd(file), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{self.path / file}: unexpected end of file at byte {offset + done}"
                )
            done += n

    def read(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> np.ndarray:
        """A tensor or a [rows, cols] slice of it (only the rows' bytes are read)."""
        info = self.tensors[name]
        dtype, shape = ST_TO_DTYPE[info.dtype], info.shape
        r0, r1 = rows or (0, shape[0])
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        if cols is None or len(shape) == 1 or cols == (0, shape[1]):
            out = np.empty((r1 - r0, *shape[1:]), dtype=dtype)
            self._pread_into(info.file, out, info.offset + r0 * row_bytes)
            return out
        c0, c1 = cols
        out = np.empty((r1 - r0, c1 - c0), dtype=dtype)
        chunk = max(1, _COL_CHUNK_BYTES // max(row_bytes, 1))
        for a in range(r0, r1, chunk):
            b = min(a + chunk, r1)
            rows = self._mapped(info.file, info.offset + a * row_bytes, (b - a) * row_bytes)
            out[a - r0 : b - r0] = rows.view(dtype).reshape(b - a, shape[1])[:, c0:c1]
        return out

    def _mapped(self, file: str, offset: int, nbytes: int) -> np.ndarray:
        """The file's bytes [offset, offset + nbytes) as a read-only array over a mapping
        (unmapped when the array is freed); only the pages touched are faulted in."""
        fd = self._fd(file)
        if os.fstat(fd).st_size < offset + nbytes:
            raise CheckpointError(
                f"{self.path / file}: unexpected end of file before byte {offset + nbytes}"
            )
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, offset - start + nbytes, prot=mmap.PROT_READ, offset=start)
        return np.frombuffer(mm, np.uint8, nbytes, offset - start)

    def raw_rows(self, name: str, rows: tuple[int, int] | None = None) -> FileSlice:
        """The byte range of rows [r0, r1) of `name` (whole tensor without `rows`)."""
        info = self.tensors[name]
        shape = info.shape
        r0, r1 = rows or (0, shape[0])
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        return FileSlice(
            self.path / info.file,
            info.offset + r0 * row_bytes,
            (r1 - r0) * row_bytes,
            ST_TO_DTYPE[info.dtype],
            (r1 - r0, *shape[1:]),
        )

    def values(self, base: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """Float32 values of rows x cols of the linear weight `base`, any bounds: in an FP8
        checkpoint the covering blocks are read and dequantised, then cropped."""
        name = base + ".weight"
        if self.block is None:
            return self.read(name, rows, cols).astype(np.float32)
        b0, b1 = self.block
        n_rows, n_cols = self.tensors[name].shape
        (r0, r1), (c0, c1) = rows, cols
        big_rows = (r0 // b0 * b0, min(math.ceil(r1 / b0) * b0, n_rows))
        big_cols = (c0 // b1 * b1, min(math.ceil(c1 / b1) * b1, n_cols))
        q = self.read(name, big_rows, big_cols)
        scale = self.read(
            base + ".weight_scale_inv",
            (big_rows[0] // b0, math.ceil(big_rows[1] / b0)),
            (big_cols[0] // b1, math.ceil(big_cols[1] / b1)),
        )
        w = dequantize_block(q, scale, self.block)
        return w[r0 - big_rows[0] : r1 - big_rows[0], c0 - big_cols[0] : c1 - big_cols[0]]

    def fp8_slice(
        self, base: str, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[FileSlice | np.ndarray, np.ndarray]:
        """FP8 bytes and block scales of a block-aligned slice, to be stored verbatim: the
        bytes as their file range when the slice is whole rows (the writer copies them
        file to file), else read; the scales always read (the caller checks them)."""
        name = base + ".weight"
        (b0, b1), width = self.block, self.tensors[name].shape[1]
        if rows[0] % b0 or cols[0] % b1:
            raise ValueError(f"{name}: slice {rows} x {cols} does not start on an FP8 block")
        scale = self.read(
            base + ".weight_scale_inv",
            (rows[0] // b0, math.ceil(rows[1] / b0)),
            (cols[0] // b1, math.ceil(cols[1] / b1)),
        )
        if cols == (0, width):
            return self.raw_rows(name, rows), scale
        return self.read(name, rows, cols), scale

    def check_scales(self, warn: Callable[[str], None] = print, strict: bool = False) -> None:
        """Refuse NaN/Inf/non-positive block scales (reads only the scale tensors); scales
        that let weights exceed any trained model's (`weight_check.MAX_SCALE`) are a
        warning, an error under `strict`."""
        for name, info in self.tensors.items():
            if not name.endswith(".weight_scale_inv") or is_ignored(name, self.model):
                continue
            s = self.read(name)
            bad = ~np.isfinite(s)
            if bad.any():
                raise CheckpointError(
                    f"{self.path / info.file}: tensor {name} has {int(bad.sum())} NaN/Inf values"
                )
            if (s <= 0).any():
                raise CheckpointError(
                    f"{self.path / info.file}: tensor {name} has {int((s <= 0).sum())} "
                    "non-positive scales"
                )
            top = float(s.max())
            if top > MAX_SCALE:
                msg = (
                    f"{self.path / info.file}: tensor {name} has scale {top:.3g}: its weights "
                    f"reach {top * FP8_MAX:.3g}, beyond any trained model (> {MAX_WEIGHT_MAGNITUDE:g})"
                )
                if strict:
                    raise CheckpointError(f"{msg} (--strict)")
                warn(f"warning: {msg}")

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _check_expected(path: Path, model: ModelConfig, tensors: dict[str, SourceTensor]) -> list[str]:
    """Raise on missing/mistyped/misshaped tensors; return unknown (not expected, not ignored)."""
    expected = {t.name: t for t in hf_tensors(model)}
    missing = [n for n in expected if n not in tensors]
    if missing:
        first = expected[missing[0]]
        what = (
            f" (the FP8 block scales of {first.name.removesuffix('_scale_inv')})"
            if first.is_scale
            else ""
        )
        raise CheckpointError(
            f"{path}: {len(missing)} expected tensor(s) missing from the checkpoint: "
            f"{_listing(missing)}{what}"
        )
    for name, want in expected.items():
        weight = expected.get(name.removesuffix("_scale_inv")) if want.is_scale else None
        _check_tensor(path, tensors[name], want, weight)
    needed = consumed_sources(model)
    return sorted(n for n in tensors if n not in needed and not is_ignored(n, model))


def _check_tensor(path: Path, got: SourceTensor, want: HFTensor, weight: HFTensor | None) -> None:
    where = path / got.file
    want_dtype = DTYPE_TO_ST[want.dtype]
    if got.dtype != want_dtype:
        if got.dtype not in ST_TO_DTYPE:
            raise CheckpointError(f"{where}: tensor {got.name} has unsupported dtype {got.dtype}")
        raise CheckpointError(
            f"{where}: tensor {got.name} has dtype {got.dtype}, expected {want_dtype}"
        )
    if got.shape != want.shape:
        if weight is not None:
            raise CheckpointError(
                f"{where}: scale tensor {got.name} has shape {list(got.shape)}, expected "
                f"{list(want.shape)} for its weight of shape {list(weight.shape)}"
            )
        raise CheckpointError(
            f"{where}: tensor {got.name} has shape {list(got.shape)}, "
            f"expected {list(want.shape)} from config.json"
        )
