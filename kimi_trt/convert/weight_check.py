"""NaN/Inf in the weights a conversion writes, and block scales no trained model has.

A checkpoint with NaN or Inf in a weight (not only in a scale) converts into a model that
emits token 0 forever; so does one whose FP8 scales blow its weights up past any real
magnitude. The converter checks both, cheaply:

- `NonFiniteScan` sees every chunk of tensor bytes the rank writer emits - the same bytes
  it hashes, already in memory, whether copied verbatim from the checkpoint or computed -
  and counts NaN/Inf from the bit patterns (exponent all ones; e4m3fn's NaN code), with no
  conversion to float: two read-only max passes over each chunk (signed and unsigned).
- `MAX_SCALE` bounds FP8 block scales (read anyway by `HFCheckpoint.check_scales`).

Found values are a warning naming the tensor, or under `--strict` an error that stops the
conversion before the rank file is renamed into place.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

# safetensors dtype -> (unsigned word of its width, the exponent bits). A value is NaN/Inf
# exactly when its exponent bits are all ones (e4m3fn: when all its bits but the sign are),
# so, as unsigned words, positive ones are those in [exp, 2^(w-1)) and negative ones
# those >= 2^(w-1) | exp: the signed view's max and the unsigned view's max find both in
# two read-only passes. Keyed by the file format's names: the scan works on raw bytes
# whatever array library produced them.
NONFINITE_BITS: dict[str, tuple[type, int]] = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F8_E4M3": (np.uint8, 0x7F),  # e4m3fn: no Inf; S.1111.111 is NaN
    "F8_E5M2": (np.uint8, 0x7C),
}
SCAN_BYTES = 1 << 20  # scanned at once: the second pass finds the chunk in cache
# A trained model's weights stay far below float16's range; a block scale that lets its
# weights exceed it (448 x scale > 65504) is corrupt, and its activations overflow.
MAX_WEIGHT_MAGNITUDE = 65504.0
MAX_SCALE = MAX_WEIGHT_MAGNITUDE / 448.0  # e4m3's largest finite value is 448


class NonFiniteScan:
    """Counts NaN/Inf per tensor over the chunks written, in order, for one rank file.

    Chunks may end inside an element (the writer's buffers are byte-sized); the split
    element's bytes are kept and completed by the next chunk of the same tensor.
    `on_found(name, count)` is called for a chunk with NaN/Inf (it may raise: --strict).
    """

    def __init__(self, on_found: Callable[[str, int], None] | None = None):
        self.counts: dict[str, int] = defaultdict(int)
        self._on_found = on_found
        self._name: str | None = None
        self._carry = b""

    def __call__(self, name: str, dtype: str, data: memoryview) -> None:
        """Scan the next chunk of tensor `name` (safetensors dtype `dtype`)."""
        bits = NONFINITE_BITS.get(dtype)
        if bits is None:
            return
        word, mask = bits
        size = np.dtype(word).itemsize
        data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        if name != self._name:
            self._name, self._carry = name, b""
        found = 0
        if self._carry:
            need = size - len(self._carry)
            self._carry += bytes(data[:need])
            data = data[need:]
            if len(self._carry) < size:
                return
            found += self._count(memoryview(self._carry), word, mask)
        whole = len(data) - len(data) % size
        self._carry = bytes(data[whole:])
        for start in range(0, whole, SCAN_BYTES):
            found += self._count(data[start : min(whole, start + SCAN_BYTES)], word, mask)
        if found:
            self.counts[name] += found
            if self._on_found is not None:
                self._on_found(name, found)

    @staticmethod
    def _count(data: memoryview, word: type, mask: int) -> int:
        values = np.frombuffer(data, dtype=word)
        if not len(values):
            return 0
        sign = 1 << (8 * values.itemsize - 1)
        signed = values.view(values.dtype.str.replace("u", "i"))
        if signed.max() < mask and values.max() < (sign | mask):  # the common case
            return 0
        return int(np.count_nonzero((values & word(mask)) == mask))
