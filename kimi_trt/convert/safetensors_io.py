"""Streaming safetensors writer: header first, then tensors one at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a rank file
of the real model is ~130 GB. Here the header is computed from shapes alone, tensors are
appended in header order and hashed on the fly, and the file appears under its final name
only after fsync + atomic rename, so a crash never leaves a file that looks complete.

A part may also be a `FileSlice`: bytes stored verbatim in another file (an FP8 weight kept
as is). Those are streamed through one small reused buffer - pread, sha256, write - so
they never become a tensor: no fresh allocation (page faults), no dtype or layout copy,
and the buffer stays in the CPU cache between the hash and the write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_trt.errors import CheckpointError

DTYPE_TO_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
COPY_CHUNK_BYTES = 1 << 20  # verbatim copies: read and hashed at once, stays in CPU cache
# Bytes per write(2). Measured on ext4 (Linux 6.18 VM): writes of 512 KB and more cost ~10x
# the kernel time of 64-256 KB writes (page cache folios sized to the write, costly to
# allocate), so every write, however large the tensor, goes out in slices of this size.
WRITE_SLICE_BYTES = 128 << 10


@dataclass(frozen=True)
class FileSlice:
    """Bytes [offset, offset + nbytes) of `path`: `shape` elements of `dtype`, row-major."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write tensors in the order of `specs`; `close()` fsyncs and renames into place.

    Use as a context manager: on an exception the temporary file is removed.
    """

    def __init__(
        self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.specs = list(specs)
        self._next = 0
        self._sha = hashlib.sha256()
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for s in self.specs:
            header[s.name] = {
                "dtype": DTYPE_TO_ST[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        self._sources: dict[Path, int] = {}  # fds of FileSlice sources, closed with the file
        self._buf: memoryview | None = None
        self._fh = open(self.tmp, "wb", buffering=0)
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.sha256: str | None = None

    def _emit(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_SLICE_BYTES):
            piece = view[start : start + WRITE_SLICE_BYTES]
            while piece:
                piece = piece[self._fh.write(piece) :]
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: expected {spec.name} {spec.dtype} {spec.shape}, "
                f"got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().contiguous().cpu()
        self._emit(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write the next tensor as consecutive row-major chunks (bounded memory).

        Each part (a tensor or a `FileSlice`) has the spec's dtype; their elements, concatenated in order, are the
        tensor's (the total count is checked) (e.g. one expert's up rows, then its gate rows, of a
        stacked [E, 2I, H] tensor). Used for stacked experts and large vocab matrices.
        """
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        spec = self.specs[self._next]
        want = math.prod(spec.shape)
        got = 0
        for part in parts:
            if name != spec.name or part.dtype != spec.dtype:
                raise ValueError(
                    f"{self.path}: part of {name} {part.dtype} {tuple(part.shape)} does not "
                    f"fit {spec.name} {spec.dtype} {spec.shape}"
                )
            if isinstance(part, FileSlice):
                self._copy_slice(part)
            else:
                t = part.detach().contiguous().cpu()
                self._emit(memoryview(t.view(torch.uint8).numpy()))
            got += part.numel()
        if got != want:
            raise ValueError(f"{self.path}: {name} got {got} elements, expected {want}")
        self._next += 1

    def _copy_slice(self, part: FileSlice) -> None:
        """Stream a verbatim byte range through the reused buffer (short reads retried)."""
        if self._buf is None:
            self._buf = memoryview(bytearray(COPY_CHUNK_BYTES))
        fd = self._sources.get(part.path)
        if fd is None:
            fd = self._sources[part.path] = os.open(part.path, os.O_RDONLY)
        done = 0
        while done < part.nbytes:
            want = min(len(self._buf), part.nbytes - done)
            n = os.preadv(fd, [self._buf[:want]], part.offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{part.path}: unexpected end of file at byte {part.offset + done}"
                )
            self._emit(self._buf[:n])
            done += n

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    def close(self) -> str:
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            raise ValueError(
                f"{self.path}: {len(missing)} tensors never written, first {missing[0]}"
            )
        self._close_sources()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        self.sha256 = self._sha.hexdigest()
        return self.sha256

    def abort(self) -> None:
        self._close_sources()
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._fh.closed:
            self.close()


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
