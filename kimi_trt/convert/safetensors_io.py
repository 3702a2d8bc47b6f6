"""Streaming safetensors writer: header first, then tensors one at a time, pipelined.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a rank file
of the real model is ~130 GB. Here the header is computed from shapes alone, tensors are
appended in header order, and the file appears under its final name only after fsync +
atomic rename, so a crash never leaves a file that looks complete.

The bytes flow through a small pipeline (`OutputFile`): the caller fills page-aligned
staging buffers (a `FileSlice` - bytes kept verbatim from a source file - is `pread`
straight into one; an array is copied in once), and a writer thread hashes each full
buffer and writes it with one large write, while the caller fills the next. A fixed pool
of buffers bounds memory (`STAGE_BUFFERS x STAGE_BYTES` per file) and is the queue's
back-pressure. Each byte is copied into user space once (the read), hashed there while
the writer thread has it, and written by DMA. (`copy_file_range` would spare that copy
but not the read the checksum needs, and would write through the page cache: measured
here, buffered writes + fsync reach 0.25-0.8 GB/s where direct writes reach 1.6-2 GB/s.)

With `direct=True` (the converter) writes use O_DIRECT: buffered writes spend 2-10x the
kernel time of the whole copy allocating page-cache pages on this project's ext4 VM, and
the output is not read again by the converter. Filesystems that refuse O_DIRECT (tmpfs,
some FUSE) get buffered writes in slices.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import math
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kimi_trt.checksum import ALGORITHM, Hasher, new_hasher
from kimi_trt.convert.dtypes import DTYPE_TO_ST, ST_TO_DTYPE, as_bytes
from kimi_trt.errors import CheckpointError

__all__ = ["DTYPE_TO_ST", "ST_TO_DTYPE", "FileSlice", "OutputFile", "TensorSpec"]

# One write(2) per staging buffer; O_DIRECT needs its offsets and lengths 4 KB-aligned.
# Measured here: direct writes of 1-16 MB all reach 1.6-2.1 GB/s; 8 MB keeps the per-call
# cost small and four of them in flight bound memory at 32 MB per file.
STAGE_BYTES = 8 << 20
STAGE_BUFFERS = 4
DIRECT_ALIGN = 4096
# Buffered fallback: writes of 512 KB and more cost ~10x the kernel time of 64-256 KB
# writes on ext4 (page cache folios sized to the write), so they go out in slices.
WRITE_SLICE_BYTES = 128 << 10


# Staging buffers outlive their file: the next rank file reuses them instead of faulting in
# (and the kernel zeroing) fresh pages, 32 MB per file.
_SPARE_BUFFERS: queue.SimpleQueue[memoryview] = queue.SimpleQueue()


def _stage_buffer() -> memoryview:
    try:
        return _SPARE_BUFFERS.get_nowait()
    except queue.Empty:
        return memoryview(mmap.mmap(-1, STAGE_BYTES))  # page-aligned, as O_DIRECT needs


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
    """Sequential output through staging buffers, hashed and written on a writer thread.

    The caller fills `space()` and `commit`s (or `write`s a view); each full buffer goes to
    the writer thread, which hashes it, writes it at its offset and returns it to the pool.
    A write error stops the writing; it is raised to the caller at its next `commit` or in
    `finish`, with `failed_at` set to the file offset of the failed write. Any direct write
    the kernel refuses (EINVAL: the unaligned tail, or a write cut short by a file-size
    limit) switches the file to buffered writes for good.
    """

    def __init__(self, path: Path, direct: bool, hasher: Hasher | None = None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = direct and _set_direct(self.fd, True)
        self.hasher = hasher
        self.pos = 0  # file offset of the buffer being filled
        self.fill = 0
        self.failed_at: int | None = None
        self._error: BaseException | None = None
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(STAGE_BUFFERS):
            self._free.put(_stage_buffer())
        self._full: queue.Queue[tuple[memoryview, int, int] | None] = queue.Queue()
        self._stage = self._free.get()
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}")
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def space(self) -> memoryview:
        """The free part of the current staging buffer (never empty)."""
        return self._stage[self.fill :]

    def commit(self, n: int) -> None:
        """`n` more bytes were placed at the start of `space()`."""
        self.fill += n
        if self.fill == STAGE_BYTES:
            self._submit()

    def write(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            k = min(len(view) - done, STAGE_BYTES - self.fill)
            self._stage[self.fill : self.fill + k] = view[done : done + k]
            done += k
            self.commit(k)

    def _submit(self) -> None:
        self._full.put((self._stage, self.fill, self.pos))
        self.pos += self.fill
        self.fill = 0
        self._stage = self._free.get()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Writer thread: hash and write buffers in file order until the end marker."""
        while (item := self._full.get()) is not None:
            buf, n, offset = item
            if self._error is None:
                try:
                    if self.hasher is not None:
                        self.hasher.update(buf[:n])
                    self._write_at(buf[:n], offset)
                except BaseException as e:  # handed to the filling thread
                    self.failed_at, self._error = offset, e
            self._free.put(buf)

    def _write_at(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            if self.direct and (
                (len(view) - done) % DIRECT_ALIGN or (offset + done) % DIRECT_ALIGN
            ):
                self.direct = _set_direct(self.fd, False)  # the tail, or after a short write
            step = len(view) if self.direct else WRITE_SLICE_BYTES
            try:
                n = os.pwrite(self.fd, view[done : done + step], offset + done)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self.fd, False)
                continue
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def finish(self) -> None:
        """Write what is staged, wait for the writer, fsync, close."""
        if self.fill:
            self._submit()
        self._stop()
        self._raise_error()
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        """Stop the writer thread (what is queued is still written), close the file and
        hand the staging buffers back for the next file."""
        self._stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _SPARE_BUFFERS.put(self._stage)
            while not self._free.empty():
                _SPARE_BUFFERS.put(self._free.get())


@dataclass(frozen=True)
class FileSlice:
    """Bytes [offset, offset + nbytes) of `path`: `shape` elements of `dtype`, row-major."""

    path: Path
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": DTYPE_TO_ST[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob


class StreamingSafetensorsWriter:
    """Write tensors in the order of `specs`; `close()` fsyncs, renames into place and
    returns the file's checksum (`checksum.ALGORITHM`).

    Use as a context manager: on an exception the temporary file is removed.
    `on_data(name, st_dtype, chunk)`, when given, sees every chunk of tensor bytes in file
    order before it is written (the converter's NaN/Inf scan); it may raise to abort the file.
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
        head = _header(self.specs, metadata)
        self._starts = [len(head)]  # file offset of each tensor's first byte
        for s in self.specs:
            self._starts.append(self._starts[-1] + s.nbytes)
        self._on_data = on_data
        self._sources: dict[Path, int] = {}  # fds of FileSlice sources, closed with the file
        self._out = OutputFile(self.tmp, direct, new_hasher(ALGORITHM))
        self._out.write(memoryview(head))
        self.checksum: str | None = None

    def tensor_at(self, offset: int) -> str:
        """Name of the tensor holding file byte `offset` (the header: the first tensor)."""
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        return self.specs[min(i, len(self.specs) - 1)].name

    @property
    def failed_tensor(self) -> str | None:
        """The tensor whose write failed (an OSError from a write names it), else None."""
        at = self._out.failed_at
        return None if at is None else self.tensor_at(at)

    def _spec(self, name: str) -> TensorSpec:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        return self.specs[self._next]

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._spec(name)
        if name != spec.name or array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: expected {spec.name} {spec.dtype} {spec.shape}, "
                f"got {name} {array.dtype} {tuple(array.shape)}"
            )
        self._emit_array(spec, array)
        self._next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write the next tensor as consecutive row-major chunks (bounded memory).

        Each part (an array or a `FileSlice`) has the spec's dtype; their elements,
        concatenated in order, are the tensor's (the total count is checked), e.g. one
        expert's up rows, then its gate rows, of a stacked [E, 2I, H] tensor.
        """
        spec = self._spec(name)
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
                self._emit_array(spec, part)
            got += math.prod(part.shape)
        if got != want:
            raise ValueError(f"{self.path}: {name} got {got} elements, expected {want}")
        self._next += 1

    def _emit_array(self, spec: TensorSpec, array: np.ndarray) -> None:
        view = as_bytes(array)
        if self._on_data is not None:
            self._on_data(spec.name, DTYPE_TO_ST[spec.dtype], view)
        self._out.write(view)

    def _copy_slice(self, spec: TensorSpec, part: FileSlice) -> None:
        """Read a verbatim byte range straight into the staging buffers (short reads
        retried); `on_data` sees it there, hashing and writing happen on the writer thread."""
        fd = self._sources.get(part.path)
        if fd is None:
            fd = self._sources[part.path] = os.open(part.path, os.O_RDONLY)
        done = 0
        while done < part.nbytes:
            space = self._out.space()
            view = space[: min(len(space), part.nbytes - done)]
            n = os.preadv(fd, [view], part.offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{part.path}: unexpected end of file at byte {part.offset + done}"
                )
            if self._on_data is not None:
                self._on_data(spec.name, DTYPE_TO_ST[spec.dtype], view[:n])
            self._out.commit(n)
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
        self._out.finish()
        os.replace(self.tmp, self.path)
        self.checksum = self._out.hasher.hexdigest()
        return self.checksum

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
