"""Streaming safetensors writer: header first, then tensors one at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a rank file
of the real model is ~130 GB. Here the header is computed from shapes alone, tensors are
appended in header order and hashed on the fly, and the file appears under its final name
only after fsync + atomic rename, so a crash never leaves a file that looks complete.

A part may also be a `FileSlice`: bytes stored verbatim in another file (an FP8 weight kept
as is). Those are streamed through one small reused buffer - pread, sha256, write - so
they never become a tensor: no fresh allocation (page faults), no dtype or layout copy.

With `direct=True` (the converter) the file is written with O_DIRECT from a page-aligned
staging buffer: measured on this project's ext4 VM, buffered writes spend 2-10x the
kernel time of the whole copy allocating page-cache pages, direct writes almost none, and
the output is not read again by the converter. Filesystems that refuse O_DIRECT (tmpfs,
some FUSE) get buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable
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
STAGE_BYTES = 1 << 20  # O_DIRECT staging buffer: written whenever full (aligned offsets)
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on/off for `fd`; False where the filesystem does not support it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return on


class OutputFile:
    """Sequential writes to a new file: staged and O_DIRECT, or buffered in slices.

    `write` copies into the staging buffer; `space`/`commit` let a caller read straight
    into it instead. Any direct write the kernel refuses (EINVAL: an unaligned tail, or a
    write cut short by a file-size limit) switches the file to buffered writes for good.
    """

    def __init__(self, path: Path, direct: bool):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0  # bytes handed to the kernel
        self.direct = direct and _set_direct(self.fd, True)
        self.stage = memoryview(mmap.mmap(-1, STAGE_BYTES)) if self.direct else None
        self.fill = 0

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def space(self) -> memoryview | None:
        """The free part of the staging buffer (never empty), or None when not staging."""
        return None if self.stage is None else self.stage[self.fill :]

    def commit(self, n: int) -> None:
        """`n` more bytes were placed at the start of `space()`."""
        self.fill += n
        if self.fill == STAGE_BYTES:
            self._flush()

    def write(self, view: memoryview) -> None:
        if self.stage is None:
            self._write_at(view)
            return
        done = 0
        while done < len(view):
            k = min(len(view) - done, STAGE_BYTES - self.fill)
            self.stage[self.fill : self.fill + k] = view[done : done + k]
            done += k
            self.commit(k)

    def _flush(self) -> None:
        if self.direct and self.fill % DIRECT_ALIGN:
            self.direct = _set_direct(self.fd, False)
        self._write_at(self.stage[: self.fill])
        self.fill = 0

    def _write_at(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            step = len(view) if self.direct else WRITE_SLICE_BYTES
            try:
                n = os.pwrite(self.fd, view[done : done + step], self.pos)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self.fd, False)
                continue
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
            self.pos += n

    def finish(self) -> None:
        """Write what is staged, fsync, close."""
        if self.fill:
            self._flush()
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    `on_data(name, st_dtype, chunk)`, when given, sees every chunk of tensor bytes in file
    order as it is hashed (the converter's NaN/Inf scan); it may raise to abort the file.
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        direct: bool = False,
        on_data: Callable[[str, str, memoryview], None] | None = None,
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
        self._on_data = on_data
        self._sources: dict[Path, int] = {}  # fds of FileSlice sources, closed with the file
        self._buf: memoryview | None = None
        self._out = OutputFile(self.tmp, direct)
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.sha256: str | None = None

    def _emit(self, data) -> None:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._out.write(view)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: expected {spec.name} {spec.dtype} {spec.shape}, "
                f"got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._emit_tensor(spec, tensor)
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
                self._copy_slice(spec, part)
            else:
                self._emit_tensor(spec, part)
            got += part.numel()
        if got != want:
            raise ValueError(f"{self.path}: {name} got {got} elements, expected {want}")
        self._next += 1

    def _emit_tensor(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        view = memoryview(t.view(torch.uint8).reshape(-1).numpy())
        if self._on_data is not None:
            self._on_data(spec.name, DTYPE_TO_ST[spec.dtype], view)
        self._emit(view)

    def _copy_slice(self, spec: TensorSpec, part: FileSlice) -> None:
        """Stream a verbatim byte range: read into the staging buffer (or the reused copy
        buffer), hash it there, write it (short reads retried)."""
        fd = self._sources.get(part.path)
        if fd is None:
            fd = self._sources[part.path] = os.open(part.path, os.O_RDONLY)
        done = 0
        while done < part.nbytes:
            space = self._out.space()
            buf = self._copy_buffer() if space is None else space
            view = buf[: min(len(buf), part.nbytes - done)]
            n = os.preadv(fd, [view], part.offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{part.path}: unexpected end of file at byte {part.offset + done}"
                )
            self._sha.update(view[:n])
            if self._on_data is not None:
                self._on_data(spec.name, DTYPE_TO_ST[spec.dtype], view[:n])
            if space is None:
                self._out.write(view[:n])
            else:
                self._out.commit(n)
            done += n

    def _copy_buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(COPY_CHUNK_BYTES))
        return self._buf

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
        self._out.finish()
        os.replace(self.tmp, self.path)
        self.sha256 = self._sha.hexdigest()
        return self.sha256

    def abort(self) -> None:
        self._close_sources()
        self._out.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._out.closed:
            self.close()


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
