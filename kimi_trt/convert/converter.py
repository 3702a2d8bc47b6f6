"""`kimi-trt convert`: HF checkpoint -> per-rank checkpoint directory, resumable and verified.

Order of work (docs/design.md "validate before touching weights"): model config, layout
check (divisibility), the fp8_block targets to requantise (block alignment), every shard's
header against the expected tensor list, the FP8 scales' values, the output directory
(refusing another model's files) - and only then the weights, rank by rank, in parallel
threads (each rank file a pipeline of its own: transforms and reads on the rank's thread,
hashing and direct writes on a writer thread). Rank files already complete and matching
their recorded checksum are reused; the manifest comes last.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits
from tqdm import tqdm

import kimi_trt
from kimi_trt.checksum import manifest_algorithm
from kimi_trt.config import Parallelism, WeightFormats, load_model_config
from kimi_trt.convert.manifest import (
    STATE_NAME,
    ResumeState,
    build_manifest,
    verify_dir,
)
from kimi_trt.convert.rank_checkpoint import (
    CONFIG_NAME,
    MANIFEST_NAME,
    build_config,
    checkpoint_hash,
    parse_config,
    rank_file_name,
)
from kimi_trt.convert.reader import HFCheckpoint
from kimi_trt.convert.transforms import RankContext
from kimi_trt.convert.units import requantisation_plan
from kimi_trt.convert.weight_table import is_ignored, rank_tensor_specs
from kimi_trt.convert.writer import Cancelled, write_rank
from kimi_trt.errors import CheckpointError, UserError
from kimi_trt.json_files import read_json_or
from kimi_trt.mapping import Mapping, check_layout
from kimi_trt.output_dirs import prepare_output_dir, write_json_atomic

_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")


@dataclass
class ConvertResult:
    out: Path
    manifest: dict[str, Any]
    written: list[int]
    reused: list[int]
    seconds: float
    source_bytes: int
    unknown: list[str] = field(default_factory=list)


def _check_out_dir(out: Path, config_hash: str, world: int) -> None:
    """Refuse an output dir holding another model's (or layout's) files; drop stale temps."""
    prepare_output_dir(out)
    cfg_path = out / CONFIG_NAME
    if cfg_path.exists():
        raw = read_json_or(cfg_path, {})
        ours = raw.get("kimi_trt") if isinstance(raw, dict) else None
        if not isinstance(ours, dict):
            raise UserError(
                f"{cfg_path}: output dir holds another model's files (config.json is not a "
                "kimi_trt per-rank config); choose an empty --out"
            )
        if ours.get("config_hash") != config_hash:
            raise UserError(
                f"{cfg_path}: output dir holds a conversion of a different model, layout or "
                f"format (config_hash {ours.get('config_hash')}, this run {config_hash}); "
                "choose another --out or delete it"
            )
    for p in sorted(out.glob("*.safetensors")):
        m = _RANK_FILE.fullmatch(p.name)
        if m is None or int(m.group(1)) >= world:
            raise UserError(
                f"{p}: output dir holds a safetensors file this conversion would not write "
                f"(world size {world}); choose an empty --out"
            )
    for p in out.glob("rank*.safetensors.tmp"):  # a killed run's partial rank file
        p.unlink()
    for name in (STATE_NAME, CONFIG_NAME, MANIFEST_NAME):
        (out / f"{name}.tmp").unlink(missing_ok=True)


def _report_nonfinite(
    out: Path, entries: list[dict[str, Any]], strict: bool, warn: Callable[[str], None]
) -> None:
    """NaN/Inf the rank files hold (written now or reused): a warning per tensor, or under
    --strict an error (a reused file may come from a run without --strict)."""
    for rank, entry in enumerate(entries):
        for name, found in sorted(entry.get("nonfinite", {}).items()):
            msg = (
                f"{out / rank_file_name(rank)}: tensor {name} holds {found['count']} NaN/Inf "
                f"values (from {found['sources']})"
            )
            if strict:
                raise CheckpointError(f"{msg} (--strict)")
            warn(f"warning: {msg}")


def _write_config(out: Path, config: dict[str, Any]) -> None:
    path = out / CONFIG_NAME
    text = json.dumps(config, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        write_json_atomic(path, config)


def _source_summary(reader: HFCheckpoint, unknown: list[str]) -> dict[str, Any]:
    ignored = sorted(n for n in reader.tensors if is_ignored(n, reader.model))
    return {
        "tensors": len(reader.tensors),
        "bytes": reader.source_bytes,
        "ignored": ignored,
        "unknown": unknown,
    }


def _run_ranks(
    ranks: list[int],
    make_ctx,
    out: Path,
    meta,
    state: ResumeState,
    bar: tqdm,
    jobs: int,
    strict: bool,
) -> None:
    """Convert `ranks` on `jobs` threads; the first error stops the others and is raised.

    The ranks are the parallelism: BLAS (the MLA absorption's matmuls) gets one thread,
    else its idle threads spin between the many small matmuls (measured: ~7% of the CPU)."""
    stop = threading.Event()
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    def one(rank: int) -> None:
        entry = write_rank(make_ctx(rank), out, meta(rank), advance, stop, strict)
        state.record(rank, entry)

    errors: list[BaseException] = []
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, r) for r in ranks]
        for fut in futures:
            try:
                fut.result()
            except Cancelled:
                continue
            except BaseException as e:  # re-raised below, after the other ranks stopped
                stop.set()
                errors.append(e)
    if errors:
        raise errors[0]


def run_conversion(
    checkpoint: str | Path,
    out: str | Path,
    parallelism: Parallelism,
    formats: WeightFormats,
    *,
    strict: bool = False,
    verify: bool = False,
    progress: bool = True,
    jobs: int | None = None,
    warn=print,
) -> ConvertResult:
    """Convert (or resume converting) `checkpoint` into per-rank files under `out`."""
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_model_config(checkpoint)
    mapping = Mapping.from_parallelism(parallelism)
    check_layout(model, mapping)
    requantised = requantisation_plan(model, mapping, formats)
    reader, unknown = HFCheckpoint.open(checkpoint, model)
    if unknown and strict:
        raise CheckpointError(
            f"{checkpoint}: {len(unknown)} unknown tensor(s) not in the Kimi-K2 layout: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} (--strict)"
        )
    if unknown:
        warn(f"warning: {len(unknown)} unknown tensor(s) ignored: {', '.join(unknown[:10])}")
    reader.check_scales(warn, strict)
    h = checkpoint_hash(model, mapping, formats)
    world = mapping.world_size
    _check_out_dir(out, h, world)
    config = build_config(model, mapping, formats, h, kimi_trt.__version__)
    _write_config(out, config)
    state = ResumeState(out, h)
    reused = [r for r in range(world) if state.reusable(out, r) is not None]
    todo = [r for r in range(world) if r not in reused]
    if todo:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    total = sum(sum(t.nbytes for t in rank_tensor_specs(model, mapping, formats, r)) for r in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)

    def meta(rank: int) -> dict[str, str]:
        return {
            "format": "pt",
            "kimi_trt_config_hash": h,
            "rank": str(rank),
            "world_size": str(world),
        }

    def make_ctx(rank: int) -> RankContext:
        return RankContext(reader, model, mapping, formats, rank)

    n_jobs = jobs or min(len(todo) or 1, os.cpu_count() or 1, 4)
    try:
        _run_ranks(todo, make_ctx, out, meta, state, bar, n_jobs, strict)
    finally:
        bar.close()
    cfg = parse_config(config, str(out / CONFIG_NAME), out)
    entries = [state.ranks[str(r)] for r in range(world)]
    _report_nonfinite(out, entries, strict, warn)
    manifest = build_manifest(out, cfg, entries, _source_summary(reader, unknown), requantised)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    if verify:
        verify_dir(out)
    return ConvertResult(
        out, manifest, todo, reused, time.perf_counter() - t0, reader.source_bytes, unknown
    )


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    parallelism: Parallelism,
    formats: WeightFormats,
    **kwargs: Any,
) -> dict[str, Any]:
    """`run_conversion` for callers that only need the manifest (the build stage)."""
    return run_conversion(checkpoint, out, parallelism, formats, **kwargs).manifest


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def render_summary(result: ConvertResult) -> str:
    """One screen: layout, formats, files, bytes by class, lossy errors, throughput."""
    m = result.manifest
    mp = m["mapping"]
    lines = [
        f"per-rank checkpoint: {result.out}",
        f"  layout   world {m['world_size']}: tp {mp['tp_size']}, ep {mp['moe_ep_size']}, "
        f"moe_tp {mp['moe_tp_size']}, attention_dp {'yes' if mp['enable_attention_dp'] else 'no'}",
        "  formats  " + ", ".join(f"{k}={v}" for k, v in m["weight_formats"].items() if v),
    ]
    algorithm = manifest_algorithm(m)
    for name, info in m["files"].items():
        rank = _RANK_FILE.fullmatch(name)
        status = ""
        if rank:
            status = "reused" if int(rank.group(1)) in result.reused else "written"
        digest = info[algorithm][:12]
        lines.append(f"  {name:<22} {_size(info['bytes']):>10}  {digest}  {status}")
    classes = ", ".join(f"{k} {_size(v)}" for k, v in m["bytes_by_class"].items() if v)
    lines.append(f"  classes  {classes}")
    for target, why in m.get("requantised", {}).items():
        lines.append(f"  requant  {target}: FP8 blocks do not line up ({why})")
    for cls, err in {**m["requant_error"], **m["derived_error"]}.items():
        if not err["exact"]:
            fmt = err.get("format", "derived")
            lines.append(
                f"  error    {cls} ({fmt}): max rel {err['max_rel_err']:.2e}, "
                f"mean rel {err['mean_rel_err']:.2e}"
            )
    rate = result.source_bytes / result.seconds if result.seconds else 0.0
    lines.append(
        f"  done     {len(result.written)} rank file(s) written, {len(result.reused)} reused, "
        f"{result.seconds:.1f} s ({_size(rate)}/s of source)"
    )
    return "\n".join(lines)
