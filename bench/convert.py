"""Benchmark: `kimi-trt convert` vs a raw copy of the same files, and peak RSS vs model size.

In one run, on synthetic checkpoints with Kimi-K2 tensor shapes (preset k2-shapes, with
the number of layers/experts/vocab chosen to fit the machine):
  1. copy     `cp -r ckpt copy && sync`                       (the disk-speed floor)
     and a user-space stream copy (read + sha256 + write + fsync of every byte: the floor
     for any converter that checksums what it writes)
  2. convert  `kimi-trt convert --tp 8 --ep 8` (fp8_block)    (same files, same cache state)
  3. the same two steps on a ~2x-size checkpoint (3x the experts), for peak RSS
Both timed steps read a source that was just read once (page cache warm for both), and
both end with their output on disk (cp: sync; convert: fsync per rank file).
Each measurement is repeated `--repeat` times, interleaved (copy, convert, copy, ...), and
the medians are reported: on a shared machine single timings swing by 2-5x.
Peak RSS is the converter process's ru_maxrss. Results: bench/results/convert.json.

Targets (issue 3): convert <= 1.3 x copy; peak RSS <= 1.5 GB + largest tensor, and the
same at 2x checkpoint size.

    .venv/bin/python bench/convert.py [--work DIR] [--layers 3] [--experts 16] [--vocab 32768]
                                      [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kimi_trt.convert.hf_layout import hf_tensors  # noqa: E402
from kimi_trt.convert.safetensors_io import OutputFile  # noqa: E402
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "results" / "convert.json"


def synth(work: Path, name: str, layers: int, experts: int, vocab: int) -> Path:
    out = work / name
    cfg = preset_config("k2-shapes", layers=layers, experts=experts, vocab=vocab)
    stamp = out / ".synth-config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == cfg.to_hf_dict():
        return out
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_checkpoint(cfg, out, seed=0, progress=True)
    stamp.write_text(json.dumps(cfg.to_hf_dict()))
    print(f"synth {name}: {time.perf_counter() - t:.0f} s", flush=True)
    return out


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def warm(path: Path) -> None:
    """Read every file once so copy and convert both start from the same cache state."""
    for p in sorted(path.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_copy(src: Path, dst: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of cp and sync) of `cp -r` + `sync`."""
    shutil.rmtree(dst, ignore_errors=True)
    t, cpu = time.perf_counter(), children_cpu()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t, children_cpu() - cpu


def timed_stream_copy(src: Path, dst: Path) -> float:
    """The floor for any user-space converter: read, sha256 and write every byte, fsync
    (one thread, through the converter's output path: O_DIRECT staging buffer)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for p in sorted(src.glob("*.safetensors")):
        sha = hashlib.sha256()
        out = OutputFile(dst / p.name, direct=True)
        with open(p, "rb", buffering=0) as fin:
            while n := fin.readinto(space := out.space()):
                sha.update(space[:n])
                out.commit(n)
        out.finish()
    return time.perf_counter() - t


def timed_convert(src: Path, out: Path, tp: int) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds of one `kimi-trt convert` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kimi_trt.cli", "convert", "--quiet", "--checkpoint", str(src)]
    cmd += ["--out", str(out), "--tp", str(tp), "--ep", str(tp)]
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(time.perf_counter() - t, ru.ru_maxrss, ru.ru_utime + ru.ru_stime)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    seconds, maxrss_kb, cpu = proc.stdout.split()
    return float(seconds), int(maxrss_kb) * 1024, float(cpu)


def measure_round(one: Path, two: Path, work: Path, tp: int) -> dict[str, float]:
    """One interleaved round: copy, stream copy and convert of 1x, then copy and convert
    of 2x; every output removed again."""
    r: dict[str, float] = {}
    warm(one)
    r["copy_s"], r["copy_cpu_s"] = timed_copy(one, work / "copy")
    shutil.rmtree(work / "copy")
    warm(one)
    r["stream_s"] = timed_stream_copy(one, work / "copy")
    shutil.rmtree(work / "copy")
    warm(one)
    r["convert_s"], r["rss1"], r["convert_cpu_s"] = timed_convert(one, work / "out-1x", tp)
    r["out_bytes"] = size_of(work / "out-1x")
    shutil.rmtree(work / "out-1x")
    warm(two)
    r["copy2_s"], _ = timed_copy(two, work / "copy")
    shutil.rmtree(work / "copy")
    warm(two)
    r["convert2_s"], r["rss2"], _ = timed_convert(two, work / "out-2x", tp)
    shutil.rmtree(work / "out-2x")
    r["convert_over_copy"] = r["convert_s"] / r["copy_s"]
    r["convert_over_copy_2x"] = r["convert2_s"] / r["copy2_s"]
    return r


def largest_tensor(ckpt: Path) -> int:
    from kimi_trt.config import load_model_config

    return max(t.nbytes for t in hf_tensors(load_model_config(ckpt)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kimi_bench_convert"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="Interleaved rounds; medians.")
    ap.add_argument("--keep", action="store_true", help="Keep the work dir afterwards.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    one = synth(args.work, "ckpt-1x", args.layers, args.experts, args.vocab)
    two = synth(args.work, "ckpt-2x", args.layers, args.experts * 3, args.vocab)

    rounds = [measure_round(one, two, args.work, args.tp) for _ in range(args.repeat)]
    for i, r in enumerate(rounds):
        print(f"round {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()), flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    copy_s, stream_s, conv_s = med("copy_s"), med("stream_s"), med("convert_s")
    copy2_s, conv2_s = med("copy2_s"), med("convert2_s")
    ratio, ratio2 = med("convert_over_copy"), med("convert_over_copy_2x")
    rss1, rss2 = int(max(r["rss1"] for r in rounds)), int(max(r["rss2"] for r in rounds))
    out_bytes = int(rounds[0]["out_bytes"])
    big1, big2 = largest_tensor(one), largest_tensor(two)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "layout": f"tp{args.tp} ep{args.tp}, fp8_block",
        "checkpoint_1x": {
            "preset": "k2-shapes",
            "layers": args.layers,
            "experts": args.experts,
            "vocab": args.vocab,
            "bytes": size_of(one),
            "largest_tensor_bytes": big1,
        },
        "checkpoint_2x": {
            "experts": args.experts * 3,
            "bytes": size_of(two),
            "largest_tensor_bytes": big2,
        },
        "repeat": args.repeat,
        "statistic": "median over interleaved rounds (ratios: median of per-round ratios)",
        "copy_seconds": copy_s,
        "convert_seconds": conv_s,
        "convert_over_copy": ratio,
        "copy_cpu_seconds": med("copy_cpu_s"),
        "convert_cpu_seconds": med("convert_cpu_s"),
        "cpu_note": "user+system of the processes; kernel writeback threads not counted",
        "stream_copy_seconds": stream_s,
        "convert_over_stream_copy": conv_s / stream_s,
        "output_bytes_1x": out_bytes,
        "copy_seconds_2x": copy2_s,
        "convert_seconds_2x": conv2_s,
        "convert_over_copy_2x": ratio2,
        "peak_rss_bytes_1x": rss1,
        "peak_rss_bytes_2x": rss2,
        "targets": {
            "convert_le_1.3x_copy": ratio <= 1.3,
            "convert_le_1.3x_copy_2x": ratio2 <= 1.3,
            "rss_1x_le_1.5GB_plus_largest": rss1 <= 1.5e9 + big1,
            "rss_2x_le_1.5GB_plus_largest": rss2 <= 1.5e9 + big2,
            "rss_2x_over_1x": rss2 / rss1,
        },
        "rounds": rounds,
        "ru_maxrss_note": "includes torch import and file pages mapped while reading",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
