"""Write one rank file: walk the weight table in file order, stream each target's parts.

The header comes from `rank_tensor_specs` (shapes alone), then every target is written
part by part as its transform yields them, hashed on the fly by the streaming writer's
writer thread and renamed into place only when complete. A scale tensor follows its
weight, so its (small) parts are kept until the weight is written. The same bytes pass a
NaN/Inf scan (`weight_check.NonFiniteScan`) on their way out. Write errors (disk full,
file-size limit) become one-line `CheckpointError`s naming the file and the tensor whose
bytes failed to write; the temp file is removed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kimi_trt.checksum import ALGORITHM
from kimi_trt.convert.rank_checkpoint import rank_file_name
from kimi_trt.convert.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from kimi_trt.convert.transforms import TRANSFORMS, Part, RankContext, Stored
from kimi_trt.convert.weight_check import NonFiniteScan
from kimi_trt.convert.weight_table import rank_tensor_specs, rule_instances, rule_targets
from kimi_trt.errors import CheckpointError


class Cancelled(Exception):
    """Another rank failed; this one stops at the next part boundary."""


def _parts(
    gen: Iterator[Part],
    scales: list[Stored],
    advance: Callable[[int], None],
    stop: threading.Event,
) -> Iterator[Stored]:
    for weight, scale in gen:
        if stop.is_set():
            raise Cancelled
        if scale is not None:
            scales.append(scale)
        advance(weight.nbytes)
        yield weight


def _sources(rule, layer: int | None) -> str:
    """The HF tensors a rule instance reads, for messages ({E}: every expert)."""
    prefix = f"model.layers.{layer}." if layer is not None else ""
    return ", ".join(prefix + s for s in rule.sources)


def write_rank(
    ctx: RankContext,
    out: Path,
    metadata: dict[str, str],
    advance: Callable[[int], None],
    stop: threading.Event,
    strict: bool = False,
) -> dict[str, Any]:
    """Convert and write rank{ctx.rank}.safetensors; returns its resume-state entry.

    Every tensor's bytes pass a NaN/Inf scan (`weight_check`): counts go into the entry
    ("nonfinite": target -> {count, sources}); under `strict` the first one is an error.
    """
    model, mapping, formats = ctx.model, ctx.mapping, ctx.formats
    specs = rank_tensor_specs(model, mapping, formats, ctx.rank)
    path = out / rank_file_name(ctx.rank)
    current, sources, writer = specs[0].name, {}, None

    def refuse(name: str, count: int) -> None:
        raise CheckpointError(
            f"{path}: tensor {name} would hold {count} NaN/Inf values (from "
            f"{sources[name]}) (--strict)"
        )

    scan = NonFiniteScan(refuse if strict else None)
    try:
        writer = StreamingSafetensorsWriter(
            path,
            [TensorSpec(t.name, t.dtype, t.shape) for t in specs],
            metadata,
            direct=True,
            on_data=scan,
        )
        with writer:
            for rule, layer in rule_instances(model):
                targets = rule_targets(rule, model, mapping, formats, layer)
                sources.update({t.name: _sources(rule, layer) for t in targets})
                current = targets[0].name
                scales: list[Stored] = []
                gen = TRANSFORMS[rule.transform](ctx, rule, layer)
                writer.write_parts(current, _parts(gen, scales, advance, stop))
                if len(targets) > 1:
                    current = targets[1].name
                    writer.write_parts(current, scales)
                    advance(targets[1].nbytes)
            checksum = writer.close()
    except OSError as e:
        where = (writer and writer.failed_tensor) or current
        raise CheckpointError(
            f"{path}: cannot write ({e.strerror or e}) while writing tensor {where}"
        ) from None
    by_class: dict[str, int] = defaultdict(int)
    for t in specs:
        by_class[t.cls] += t.nbytes
    return {
        ALGORITHM: checksum,
        "bytes": path.stat().st_size,
        "tensors": len(specs),
        "tensor_bytes": sum(t.nbytes for t in specs),
        "bytes_by_class": dict(sorted(by_class.items())),
        "stats": {k: v.state() for k, v in sorted(ctx.stats.items())},
        "derived": {k: v.state() for k, v in sorted(ctx.derived.items())},
        "nonfinite": {k: {"count": n, "sources": sources[k]} for k, n in scan.counts.items()},
    }
