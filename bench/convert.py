"""Benchmark: `kimi-trt convert` vs a raw copy and vs DeepSeek-V3's `inference/convert.py`.

Side by side in one run, on synthetic checkpoints with Kimi-K2's tensor shapes (preset
k2-shapes; layers, experts and vocab chosen to fit the machine), for each --tp:
  copy      `cp -r ckpt out && sync`                                   (the disk floor)
  kimi      `kimi-trt convert --tp N --ep N && sync`                    (fp8_block)
  deepseek  `python convert.py --model-parallel N ... && sync`          (with --deepseek)
Each round runs the commands one after another (the order rotates between rounds), every
one from the same cache state (the source read once just before) and ending with its
output on disk (`sync`); outputs are deleted outside the timings. Reported per command:
the median over rounds of wall seconds, CPU seconds (user + system of its processes) and
peak RSS (the largest process), and the medians of the per-round ratios kimi / copy,
deepseek / copy and kimi / deepseek: on a shared machine single timings swing by 2-5x,
ratios taken within a round much less. The load average is recorded with every round.
A second checkpoint of about twice the size (more experts) is converted --rounds-2x times
for peak RSS, which must not grow with the checkpoint.
Also measured: checksum throughputs (sha256, XXH3-128, BLAKE3 if installed) and the
converter's start-up (imports) against `import torch`.

DeepSeek-V3's script is not shipped here: fetch `inference/convert.py` from the
deepseek-ai/DeepSeek-V3 repository and pass its path; it needs torch and safetensors
(the project's venv has both). Results: bench/results/convert.json.

    .venv/bin/python bench/convert.py [--deepseek PATH/convert.py] [--tp 8 2] [--rounds 5]
                                      [--layers 3] [--experts 32] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "results" / "convert.json"
# Runs `argv` and prints wall seconds, CPU seconds of its processes and their largest RSS.
TIMER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
    "w = time.perf_counter() - t; ru = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "sys.stderr.write(r.stderr.decode()[-2000:]); "
    "print(w, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024); sys.exit(r.returncode)"
)


def synth(work: Path, name: str, layers: int, experts: int, vocab: int) -> Path:
    out = work / name
    cfg = preset_config("k2-shapes", layers=layers, experts=experts, vocab=vocab)
    stamp = out / ".synth-config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == cfg.to_hf_dict():
        return out
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_checkpoint(cfg, out, seed=0, progress=False)
    stamp.write_text(json.dumps(cfg.to_hf_dict()))
    print(f"synth {name}: {size_of(out) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    return out


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def warm(path: Path) -> None:
    """Read every file once so that every command starts from the same cache state."""
    for p in sorted(path.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def commands(src: Path, out: Path, tp: int, experts: int, deepseek: Path | None) -> dict:
    """name -> shell command line (each ends with sync)."""
    kimi = f"{sys.executable} -m kimi_trt.cli convert --quiet --checkpoint {src} --out {out}"
    cmds = {
        "copy": f"cp -r {src} {out} && sync",
        "kimi": f"{kimi} --tp {tp} --ep {tp} && sync",
    }
    if deepseek is not None:
        cmds["deepseek"] = (
            f"{sys.executable} {deepseek} --hf-ckpt-path {src} --save-path {out} "
            f"--n-experts {experts} --model-parallel {tp} && sync"
        )
    return cmds


def timed(cmd: str, src: Path, out: Path) -> dict[str, float]:
    """Wall s, CPU s and peak RSS bytes of one shell command; its output removed after."""
    shutil.rmtree(out, ignore_errors=True)
    warm(src)
    proc = subprocess.run(
        [sys.executable, "-c", TIMER, "sh", "-c", cmd], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(f"{cmd}\n{proc.stderr}")
    wall, cpu, rss = (float(x) for x in proc.stdout.split())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": int(rss), "loadavg": os.getloadavg()[0]}


def run_rounds(src: Path, work: Path, tp: int, experts: int, args) -> list[dict]:
    cmds = commands(src, work / "out", tp, experts, args.deepseek)
    names = list(cmds)
    rounds = []
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        r = {name: timed(cmds[name], src, work / "out") for name in order}
        r["order"] = order
        rounds.append(r)
        print(f"tp{tp} round {i}: " + ", ".join(f"{n} {r[n]['wall_s']:.2f}s" for n in order))
    return rounds


def summarise(rounds: list[dict], names: list[str]) -> dict:
    def med(f) -> float:
        return statistics.median(f(r) for r in rounds)

    out: dict = {}
    for n in names:
        out[n] = {k: med(lambda r, n=n, k=k: r[n][k]) for k in ("wall_s", "cpu_s")}
        out[n]["peak_rss_bytes"] = max(r[n]["peak_rss_bytes"] for r in rounds)
    ratios = {"kimi_over_copy": ("kimi", "copy")}
    if "deepseek" in names:
        ratios |= {
            "deepseek_over_copy": ("deepseek", "copy"),
            "kimi_over_deepseek": ("kimi", "deepseek"),
        }
    for key, (a, b) in ratios.items():
        out[key] = med(lambda r, a=a, b=b: r[a]["wall_s"] / r[b]["wall_s"])
    out["loadavg_median"] = med(lambda r: statistics.mean(r[n]["loadavg"] for n in names))
    out["rounds"] = rounds
    return out


def hash_throughputs(mb: int = 512) -> dict[str, float]:
    """GB/s of each checksum over `mb` MB in 1 MB updates (best of 3, one thread)."""
    import xxhash

    data = memoryview(os.urandom(mb << 20))
    algos = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}
    try:
        import blake3

        algos["blake3"] = blake3.blake3
    except ImportError:
        pass
    out = {}
    for name, new in algos.items():
        best = float("inf")
        for _ in range(3):
            t, h = time.perf_counter(), new()
            for i in range(0, len(data), 1 << 20):
                h.update(data[i : i + (1 << 20)])
            best = min(best, time.perf_counter() - t)
        out[name] = len(data) / best / 1e9
    return out


def startup(repeat: int = 5) -> dict[str, float]:
    """Median wall s of a fresh interpreter importing the converter, and importing torch."""
    snippets = {
        "kimi_convert_imports_s": "import kimi_trt.cli, kimi_trt.convert.converter",
        "import_torch_s": "import torch",
        "bare_python_s": "pass",
    }
    out = {}
    for key, code in snippets.items():
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
            times.append(time.perf_counter() - t)
        out[key] = statistics.median(times)
    return out


def rss_at_2x(one: Path, two: Path, work: Path, tps: list[int], args) -> dict:
    """Peak RSS of kimi at 1x and ~2x checkpoint size (same tp), --rounds-2x each."""
    out = {}
    for tp in tps:
        peaks = {}
        for name, src, experts in (("1x", one, args.experts), ("2x", two, args.experts_2x)):
            cmd = commands(src, work / "out", tp, experts, None)["kimi"]
            runs = [timed(cmd, src, work / "out") for _ in range(args.rounds_2x)]
            peaks[name] = max(r["peak_rss_bytes"] for r in runs)
            peaks[f"wall_s_{name}"] = statistics.median(r["wall_s"] for r in runs)
        peaks["rss_2x_over_1x"] = peaks["2x"] / peaks["1x"]
        out[f"tp{tp}"] = peaks
        print(f"tp{tp} peak RSS: 1x {peaks['1x'] / 1e6:.0f} MB, 2x {peaks['2x'] / 1e6:.0f} MB")
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kimi_bench_convert"))
    ap.add_argument("--deepseek", type=Path, help="DeepSeek-V3's inference/convert.py")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--experts-2x", type=int, default=88, help="Experts of the ~2x checkpoint.")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tp", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--rounds", type=int, default=5, help="Rounds per tp; medians.")
    ap.add_argument("--rounds-2x", type=int, default=2, help="Runs per size for peak RSS.")
    ap.add_argument("--keep", action="store_true", help="Keep the work dir afterwards.")
    args = ap.parse_args()
    if args.deepseek is not None and not args.deepseek.is_file():
        ap.error(f"--deepseek {args.deepseek}: no such file")
    return args


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    one = synth(args.work, "ckpt-1x", args.layers, args.experts, args.vocab)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_at_start": os.getloadavg(),
        "checkpoint_1x": {
            "preset": "k2-shapes",
            "layers": args.layers,
            "experts": args.experts,
            "vocab": args.vocab,
            "bytes": size_of(one),
        },
        "formats": "fp8_block (defaults)",
        "statistic": "median over rounds; ratios: median of per-round ratios; peak RSS: max",
        "hash_GBps": hash_throughputs(),
        "startup_s": startup(),
    }
    print(json.dumps({k: result[k] for k in ("hash_GBps", "startup_s")}))
    for tp in args.tp:
        rounds = run_rounds(one, args.work, tp, args.experts, args)
        result[f"tp{tp}"] = summarise(rounds, [n for n in rounds[0] if n != "order"])
    two = synth(args.work, "ckpt-2x", args.layers, args.experts_2x, args.vocab)
    result["checkpoint_2x"] = {"experts": args.experts_2x, "bytes": size_of(two)}
    result["peak_rss"] = rss_at_2x(one, two, args.work, args.tp, args)
    result["loadavg_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if not k.startswith("tp")}
    for tp in args.tp:
        brief[f"tp{tp}"] = {k: v for k, v in result[f"tp{tp}"].items() if k != "rounds"}
    print(json.dumps(brief, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
