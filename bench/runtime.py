"""Benchmark: torch executor (world 1) vs transformers `generate`, same weights, same prompt.

For each synthetic model (presets tiny and small, block-FP8 checkpoint converted with the
default formats; both sides compute in float32 on the same dequantised values):
  ours          load_engine(per-rank dir).generate(greedy)
  transformers  DeepseekV3ForCausalLM(same weights).generate(do_sample=False)
Measured side by side in one run, each side in its own subprocess (so peak RSS is its own):
  decode tokens/s   (new tokens - 1) / (time to N tokens - time to 1 token), batch 1
  prefill tokens/s  prompt tokens / time to the first token (prompt of --prefill-len)
  peak RSS          ru_maxrss of the process after both measurements
Both sides use --threads torch threads (default 1: on a small shared machine, intra-op
threads that wait for a busy core make small matmuls many times slower and the ratio
noisy; --threads 0 keeps torch's default).
Target (issue 4): ours >= 1.5x transformers decode tokens/s. Results: bench/results/runtime.json.

    .venv/bin/python bench/runtime.py [--work DIR] [--presets tiny small] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "runtime.json"
PROMPT_LEN = 32


def _prompt(n: int, vocab: int) -> list[int]:
    return [(7 + 131 * i) % (vocab - 300) for i in range(n)]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker(side: str, ckpt: Path, engine_dir: Path, args) -> dict:
    """Runs in a subprocess: time one side, report JSON."""
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if side == "ours":
        from kimi_trt.runtime.engine import load_engine
        from kimi_trt.runtime.sampling import SamplingParams

        engine = load_engine(engine_dir)
        vocab = engine.vocab_size

        def gen(prompt: list[int], n: int) -> None:
            engine.generate([prompt], SamplingParams(max_new_tokens=n, stop_token_ids=()))
    else:
        from kimi_trt.testing.hf_reference import load_reference_model

        model = load_reference_model(ckpt)
        vocab = model.config.vocab_size

        def gen(prompt: list[int], n: int) -> None:
            with torch.no_grad():
                model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

    short, long = _prompt(PROMPT_LEN, vocab), _prompt(args.prefill_len, vocab)
    gen(short, 4)  # warm-up
    t1 = _best(lambda: gen(short, 1), args.repeats)
    tn = _best(lambda: gen(short, args.new_tokens), args.repeats)
    tp = _best(lambda: gen(long, 1), args.repeats)
    return {
        "decode_tokens_per_s": (args.new_tokens - 1) / (tn - t1),
        "prefill_tokens_per_s": args.prefill_len / tp,
        "time_to_first_token_s": t1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def prepare(work: Path, preset: str) -> tuple[Path, Path]:
    from kimi_trt.config import Parallelism, WeightFormats
    from kimi_trt.convert.converter import run_conversion
    from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint

    ckpt, engine = work / f"{preset}-hf", work / f"{preset}-w1"
    if not (ckpt / "config.json").is_file():
        write_synthetic_checkpoint(preset_config(preset), ckpt, seed=0, progress=False)
    if not (engine / "manifest.json").is_file():
        run_conversion(ckpt, engine, Parallelism(), WeightFormats(), progress=False)
    return ckpt, engine


def run_side(side: str, ckpt: Path, engine: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--ckpt", str(ckpt)]
    cmd += ["--engine", str(engine), "--new-tokens", str(args.new_tokens)]
    cmd += ["--prefill-len", str(args.prefill_len), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kimi_trt_bench_runtime"))
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (0 = torch default)"
    )
    ap.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.engine, args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": platform.platform(),
        "new_tokens": args.new_tokens,
        "prompt_len": PROMPT_LEN,
        "prefill_len": args.prefill_len,
        "threads": args.threads,
        "models": {},
    }
    for preset in args.presets:
        ckpt, engine = prepare(args.work, preset)
        ours = run_side("ours", ckpt, engine, args)
        hf = run_side("transformers", ckpt, engine, args)
        entry = {
            "ours": ours,
            "transformers": hf,
            "decode_speedup": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
            "prefill_speedup": ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
        }
        results["models"][preset] = entry
        print(
            f"{preset}: decode {ours['decode_tokens_per_s']:.1f} vs "
            f"{hf['decode_tokens_per_s']:.1f} tok/s ({entry['decode_speedup']:.2f}x, target 1.5x); "
            f"prefill {ours['prefill_tokens_per_s']:.0f} vs {hf['prefill_tokens_per_s']:.0f} tok/s "
            f"({entry['prefill_speedup']:.2f}x); peak RSS {ours['peak_rss_mb']:.0f} vs "
            f"{hf['peak_rss_mb']:.0f} MB"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
