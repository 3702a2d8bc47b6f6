"""Benchmark: what the checkpoint hardening of issue 21 costs, side by side in one run.

1. Load-time checksum verification (runtime/integrity): loading one rank's weights
   (`load_rank_weights`) with the check skipped, with a cold check (file hashed), and with
   the remembered check (stat only), on the tiny model and on a bigger synthetic one; plus
   the hash alone, to extrapolate to a 130 GB rank file.
2. The converter's NaN/Inf scan (convert/weight_check): `run_conversion` of a Kimi-K2-shaped
   checkpoint with the scan and with it replaced by a no-op, interleaved; and the CPU time
   spent inside the scan during the conversion against the conversion's whole CPU time.
3. The scan alone vs sha256 on 1 MB chunks, per dtype.
Every timing is the median of `--repeat` interleaved runs, as wall time and as process CPU
time: on this shared machine wall times swing 2-5x with other users' load, so the
overheads are reported from CPU time, which that load does not inflate.
Results: bench/results/hardening.json.

    .venv/bin/python bench/hardening.py [--work DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kimi_trt.convert.writer as writer_module  # noqa: E402
import kimi_trt.runtime.weights as weights_module  # noqa: E402
from kimi_trt.checksum import ALGORITHM, hash_file  # noqa: E402
from kimi_trt.config import Parallelism, WeightFormats  # noqa: E402
from kimi_trt.convert.converter import run_conversion  # noqa: E402
from kimi_trt.convert.rank_checkpoint import read_rank_config  # noqa: E402
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402
from kimi_trt.convert.weight_check import NonFiniteScan  # noqa: E402
from kimi_trt.runtime.integrity import CACHE_DIR, verify_file  # noqa: E402

RESULTS = REPO / "bench" / "results" / "hardening.json"


def cpu_timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 4) for k, v in runs.items()}


def checkpoint(work: Path, name: str, preset: str, **sizes) -> Path:
    out = work / name
    if not (out / "model.safetensors.index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        write_synthetic_checkpoint(preset_config(preset, **sizes), out, seed=0, progress=False)
    return out


def convert(src: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    run_conversion(
        src, out, Parallelism(tp=1), WeightFormats(), progress=False, warn=lambda *_: None
    )


class _NoScan:
    """Stands in for NonFiniteScan: the writer's hook is called but does nothing."""

    def __init__(self, *_):
        self.counts: dict[str, int] = {}

    def __call__(self, *_):
        return None


@contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def load_costs(ranks: Path, repeat: int) -> dict:
    """load_rank_weights: unchecked / cold check / remembered check, and the hash alone."""
    cfg = read_rank_config(ranks)
    rank_file = cfg.rank_file(0)

    def load() -> None:
        weights_module.load_rank_weights(cfg, 0, torch.float32, torch.device("cpu"))

    names = ("unchecked", "cold", "remembered", "hash")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}

    def both(name: str, fn) -> None:
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)

    load()  # warm the page cache: every variant reads a cached file
    for _ in range(repeat):
        with patched(weights_module, "verify_file", lambda *a: True):
            both("unchecked", load)
        shutil.rmtree(ranks / CACHE_DIR, ignore_errors=True)
        both("cold", load)
        both("remembered", load)
        both("hash", lambda: hash_file(rank_file, ALGORITHM))
    w, c = medians(wall), medians(cpu)
    size = rank_file.stat().st_size
    digest = hash_file(rank_file, ALGORITHM)
    remembered = min(
        cpu_timed(lambda: [verify_file(rank_file, ALGORITHM, digest) for _ in range(100)]) / 100
        for _ in range(repeat)
    )
    return {
        "rank_file_bytes": size,
        "wall_seconds": w,
        "cpu_seconds": c,
        "cold_check_cpu_vs_unchecked_load": round(c["hash"] / c["unchecked"], 4),
        "remembered_check_cpu_seconds": round(remembered, 6),
        "hash_gb_per_s_cpu": round(size / c["hash"] / 1e9, 3),
        "hash_gb_per_s_wall": round(size / w["hash"] / 1e9, 3),
    }


class _TimedScan(NonFiniteScan):
    """NonFiniteScan that adds the CPU time of its calls (this thread's) to `spent`."""

    spent: list[float] = [0.0]

    def __call__(self, *args):
        t = time.thread_time()
        super().__call__(*args)
        _TimedScan.spent[0] += time.thread_time() - t


def scan_overhead(src: Path, work: Path, repeat: int) -> dict:
    out = work / "converted-k2"
    names = ("with_scan", "no_scan")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    inside: list[float] = []
    for _ in range(repeat):
        _TimedScan.spent[0] = 0.0
        with patched(writer_module, "NonFiniteScan", _TimedScan):
            t, c = time.perf_counter(), time.process_time()
            convert(src, out)
            wall["with_scan"].append(time.perf_counter() - t)
            cpu["with_scan"].append(time.process_time() - c)
        inside.append(_TimedScan.spent[0])
        with patched(writer_module, "NonFiniteScan", _NoScan):
            t, c = time.perf_counter(), time.process_time()
            convert(src, out)
            wall["no_scan"].append(time.perf_counter() - t)
            cpu["no_scan"].append(time.process_time() - c)
    w, c = medians(wall), medians(cpu)
    scan_cpu = statistics.median(inside)
    size = (out / "rank0.safetensors").stat().st_size
    return {
        "rank_file_bytes": size,
        "wall_seconds": w,
        "cpu_seconds": c,
        "scan_cpu_seconds": round(scan_cpu, 4),
        "scan_share_of_convert_cpu": round(scan_cpu / c["with_scan"], 4),
        "scan_gb_per_s_cpu": round(size / scan_cpu / 1e9, 2),
    }


def scan_micro(repeat: int) -> dict:
    """GB/s of CPU time: the scan per dtype and sha256, on the same clean 1 MB chunk."""
    chunk = np.random.default_rng(0).integers(0, 0x7E, 1 << 20, dtype=np.uint8)
    view = memoryview(chunk)

    def rate(fn, calls: int) -> float:
        best = min(cpu_timed(lambda: [fn() for _ in range(calls)]) for _ in range(repeat))
        return round(calls * len(view) / best / 1e9, 2)

    out = {}
    for dtype in ("F8_E4M3", "BF16", "F32"):
        scan = NonFiniteScan()
        out[f"scan_{dtype}_gb_per_s"] = rate(lambda s=scan, d=dtype: s("w", d, view), 200)
    out["sha256_gb_per_s"] = rate(lambda: hashlib.sha256(view).digest(), 50)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kimi-bench-hardening"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": platform.platform(), "repeat": args.repeat}
    for name, preset, sizes in (
        ("tiny", "tiny", {}),
        ("small-8x32", "small", {"layers": 8, "experts": 32}),
    ):
        src = checkpoint(args.work, name, preset, **sizes)
        ranks = args.work / f"{name}-ranks"
        convert(src, ranks)
        result[f"load_check_{name}"] = load_costs(ranks, args.repeat)
        print(name, json.dumps(result[f"load_check_{name}"]), flush=True)
    k2 = checkpoint(args.work, "k2-shapes", "k2-shapes", layers=3, experts=8, vocab=32768)
    result["convert_nan_scan_k2_shapes"] = scan_overhead(k2, args.work, args.repeat)
    print("scan", json.dumps(result["convert_nan_scan_k2_shapes"]), flush=True)
    result["scan_vs_sha256_1mb_chunks"] = scan_micro(args.repeat)
    print("micro", json.dumps(result["scan_vs_sha256_1mb_chunks"]), flush=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
