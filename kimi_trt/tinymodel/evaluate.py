"""Evaluate the tiny tool-calling model through the real path; writes bench/results/tiny_model_eval.json.

Default (--backend mpirun): `kimi-trt convert` the block-FP8 checkpoint into per-rank files
(TP4 attention, MoE TP2 x EP2 by default), then `mpirun -np 4` this module in worker mode:
every rank loads the runtime (kimi_trt.runtime.engine.load_engine), rank 0 drives greedy
generation of both turns of every dialogue (tool call, then the answer after the tool
result). --backend hf runs the same dialogues on transformers' DeepseekV3 with the
checkpoint's dequantised weights (the model itself, without our runtime).

Both modes run in one job (--constraint both, the default): unconstrained decoding, then
the same dialogues with constrained tool calls (chat/constraint.py, as `kimi-trt serve`
applies them by default), reported side by side; transformers (--backend hf) runs
unconstrained only.

Figures and their targets: well-formed tool-call sections (>= 99%), schema-valid calls
(100% with constraints), right tool
(>= 95%), exact arguments for catalogue values asked with unseen phrasings (>= 95%), exact
arguments for the 100 held-out values (>= 80%, reported anyway), final answers restating
the tool result (>= 90%), and small talk answered without a tool.

    .venv/bin/python scripts/eval_tiny_model.py                      # convert + mpirun, TP2 x EP2
    .venv/bin/python scripts/eval_tiny_model.py --backend hf --limit 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kimi_trt.tinymodel.dialogues import (
    DEFAULT_CHECKPOINT,
    run_dialogues,
    select_cases,
    summarise,
)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def hf_generator(checkpoint: Path, eos_ids: tuple[int, ...]):
    """Greedy generation with transformers on the checkpoint's dequantised weights."""
    import torch

    from kimi_trt.testing.hf_reference import load_reference_model

    model = load_reference_model(checkpoint)

    def generate(prompts: list[list[int]], max_new: int) -> list[tuple[list[int], str]]:
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=list(eos_ids),
                    pad_token_id=eos_ids[0],
                )[0, len(prompt) :].tolist()
                stop = bool(ids) and ids[-1] in eos_ids
                out.append((ids[:-1] if stop else ids, "stop" if stop else "length"))
        return out

    return generate


MODES = {
    "both": ("unconstrained", "constrained"),
    "on": ("constrained",),
    "off": ("unconstrained",),
}


def engine_worker(args: argparse.Namespace) -> int:
    """Runs on every MPI rank (through run_rank: one-line errors, os._exit on success so a
    collective library's teardown can't fail a finished job): rank 0 drives the dialogues,
    the others follow."""
    from kimi_trt.chat.constraint import ConstraintFactory
    from kimi_trt.chat.tokenizer import KimiTokenizer
    from kimi_trt.runtime.engine import load_engine
    from kimi_trt.runtime.sampling import SamplingParams

    engine = load_engine(args.engine_dir)
    if not engine.is_driver:
        engine.worker_loop()
        return 0
    tokenizer = KimiTokenizer.from_dir(args.checkpoint)
    stop = tokenizer.eos_token_ids  # [EOS] and <|im_end|>
    factory = ConstraintFactory(tokenizer)

    def generate(prompts: list[list[int]], max_new: int, specs=None):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=stop)
        constraints = [factory.build(s) for s in specs] if specs is not None else None
        results = engine.generate(prompts, params, constraints=constraints)
        return [(r.tokens, r.finish_reason) for r in results]

    try:
        out = {}
        for mode in MODES[args.constraint]:
            start = time.time()
            cases = select_cases(args.limit)
            records = run_dialogues(
                generate, Path(args.checkpoint), cases, constrained=mode == "constrained"
            )
            out[mode] = {"records": records, "seconds": round(time.time() - start, 1)}
        Path(args.records).write_text(json.dumps(out))
    finally:
        engine.shutdown()
    return 0


def mpirun_records(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Convert to per-rank files, then run the dialogues under mpirun."""
    ckpt = work / "per-rank"
    convert = [
        str(VENV_BIN / "kimi-trt"), "convert", "--checkpoint", str(args.checkpoint),
        "--out", str(ckpt), "--tp", str(args.tp), "--ep", str(args.ep),
        "--moe-tp", str(args.moe_tp), "--quiet",
    ]  # fmt: skip
    subprocess.run(convert, check=True)
    records = work / "records.json"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("KIMI_TRT_TRACEBACK", "1")  # a bench run's internal error: show where
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    worker = [
        str(VENV_BIN / "mpirun"), "-np", str(args.tp), "--oversubscribe",
        sys.executable, "-m", "kimi_trt.tinymodel.evaluate", "--worker",
        "--engine-dir", str(ckpt), "--checkpoint", str(args.checkpoint),
        "--records", str(records), "--limit", str(args.limit or 0),
        "--constraint", args.constraint,
    ]  # fmt: skip
    subprocess.run(worker, check=True, env=env)
    return json.loads(records.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="HF checkpoint dir")
    p.add_argument("--backend", choices=("mpirun", "hf"), default="mpirun")
    p.add_argument(
        "--constraint",
        choices=tuple(MODES),
        help="constrained tool calls: both side by side (default), on, or off (hf: off only)",
    )
    p.add_argument("--tp", type=int, default=4, help="ranks (attention TP ways)")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--moe-tp", type=int, default=2)
    p.add_argument(
        "--limit", type=int, default=0, help="evaluate every k-th case to have at most N (0: all)"
    )
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers on the same checkpoint and report token agreement",
    )
    p.add_argument("--work", type=Path, help="keep per-rank files here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tiny_model_eval.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def hf_records(checkpoint: Path, limit: int) -> list[dict]:
    from kimi_trt.chat.tokenizer import KimiTokenizer

    tok = KimiTokenizer.from_dir(checkpoint)
    return run_dialogues(
        hf_generator(checkpoint, tok.eos_token_ids), checkpoint, select_cases(limit)
    )


def side_by_side(reports: dict[str, dict]) -> dict[str, dict]:
    """Each figure's rate in every mode that ran (the issue's constrained-vs-unconstrained view)."""
    figures = next(iter(reports.values()))["figures"]
    out = {name: {m: r["figures"][name]["rate"] for m, r in reports.items()} for name in figures}
    out["small_talk_without_tool_call"] = {
        m: r["small_talk_without_tool_call"]["rate"] for m, r in reports.items()
    }
    return out


def agreement(records: list[dict], reference: list[dict]) -> dict:
    """Share of dialogues whose generated call turn / answer are token-identical to the
    transformers run on the same checkpoint (greedy, so they should all be)."""
    pairs = list(zip(records, reference, strict=True))
    calls = sum(a["output"] == b["output"] for a, b in pairs)
    answers = sum(a.get("answer") == b.get("answer") for a, b in pairs)
    return {
        "same_call_turn": calls / len(pairs),
        "same_answer": answers / len(pairs),
        "n": len(pairs),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        from kimi_trt.runtime.failure import run_this_rank

        sys.exit(run_this_rank(lambda: engine_worker(args)))
    if not (args.checkpoint / "config.json").is_file():
        sys.exit(f"error: {args.checkpoint}: no config.json (expected the tiny model checkpoint)")
    t0 = time.time()
    if args.constraint is None:
        args.constraint = "off" if args.backend == "hf" else "both"
    if args.backend == "hf" and args.constraint != "off":
        sys.exit("error: --backend hf runs unconstrained only (use --constraint off)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend == "hf":
            runs = {"unconstrained": {"records": hf_records(args.checkpoint, args.limit)}}
        else:
            runs = mpirun_records(args, args.work or Path(tmp))
    reports = {mode: {**summarise(run["records"]), **run} for mode, run in runs.items()}
    first = next(iter(reports))
    report = {k: v for k, v in reports[first].items() if k != "records"}
    report.update(mode=first, total_seconds=round(time.time() - t0, 1))
    report.update(backend=args.backend, checkpoint=str(args.checkpoint), limit=args.limit or None)
    report["side_by_side"] = side_by_side(reports)
    for mode, other in list(reports.items())[1:]:
        report[mode] = {k: v for k, v in other.items() if k != "records"}
    if args.backend == "mpirun":
        report["layout"] = {"world": args.tp, "tp": args.tp, "ep": args.ep, "moe_tp": args.moe_tp}
        if args.compare_hf and "unconstrained" in runs:
            report["agreement_with_transformers"] = agreement(
                runs["unconstrained"]["records"], hf_records(args.checkpoint, args.limit)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = {f"{mode}_records": run["records"] for mode, run in runs.items()}
    args.out.write_text(json.dumps({**report, **records}, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
