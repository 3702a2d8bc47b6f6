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
Peak RSS is the converter process's ru_maxrss. Results: bench/results/convert.json.

Targets (issue 3): convert <= 1.3 x copy; peak RSS <= 1.5 GB + largest tensor, and the
same at 2x checkpoint size.

    .venv/bin/python bench/convert.py [--work DIR] [--layers 3] [--experts 16] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kimi_trt.convert.hf_layout import hf_tensors  # noqa: E402
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


def timed_copy(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def timed_stream_copy(src: Path, dst: Path) -> float:
    """The floor for any user-space converter: read, sha256 and write every byte, fsync."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for p in sorted(src.glob("*.safetensors")):
        sha = hashlib.sha256()
        with open(p, "rb", buffering=0) as fin, open(dst / p.name, "wb") as fout:
            while block := fin.read(64 << 20):
                sha.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
    return time.perf_counter() - t


def timed_convert(src: Path, out: Path, tp: int) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `kimi-trt convert` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kimi_trt.cli", "convert", "--quiet", "--checkpoint", str(src)]
    cmd += ["--out", str(out), "--tp", str(tp), "--ep", str(tp)]
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    seconds, maxrss_kb = proc.stdout.split()
    return float(seconds), int(maxrss_kb) * 1024


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
    ap.add_argument("--keep", action="store_true", help="Keep the work dir afterwards.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    one = synth(args.work, "ckpt-1x", args.layers, args.experts, args.vocab)
    two = synth(args.work, "ckpt-2x", args.layers, args.experts * 3, args.vocab)

    warm(one)
    copy_s = timed_copy(one, args.work / "copy")
    shutil.rmtree(args.work / "copy")
    warm(one)
    stream_s = timed_stream_copy(one, args.work / "copy")
    shutil.rmtree(args.work / "copy")
    warm(one)
    conv_s, rss1 = timed_convert(one, args.work / "out-1x", args.tp)
    out_bytes = size_of(args.work / "out-1x")
    shutil.rmtree(args.work / "out-1x")
    warm(two)
    copy2_s = timed_copy(two, args.work / "copy")
    shutil.rmtree(args.work / "copy")
    warm(two)
    conv2_s, rss2 = timed_convert(two, args.work / "out-2x", args.tp)
    shutil.rmtree(args.work / "out-2x")

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
        "copy_seconds": copy_s,
        "convert_seconds": conv_s,
        "convert_over_copy": conv_s / copy_s,
        "stream_copy_seconds": stream_s,
        "convert_over_stream_copy": conv_s / stream_s,
        "output_bytes_1x": out_bytes,
        "copy_seconds_2x": copy2_s,
        "convert_seconds_2x": conv2_s,
        "convert_over_copy_2x": conv2_s / copy2_s,
        "peak_rss_bytes_1x": rss1,
        "peak_rss_bytes_2x": rss2,
        "targets": {
            "convert_le_1.3x_copy": conv_s <= 1.3 * copy_s,
            "convert_le_1.3x_copy_2x": conv2_s <= 1.3 * copy2_s,
            "rss_1x_le_1.5GB_plus_largest": rss1 <= 1.5e9 + big1,
            "rss_2x_le_1.5GB_plus_largest": rss2 <= 1.5e9 + big2,
            "rss_2x_over_1x": rss2 / rss1,
        },
        "ru_maxrss_note": "includes torch import and file pages mapped while reading",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
