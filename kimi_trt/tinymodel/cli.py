"""Train the tiny Kimi-K2-architecture tool-calling model (kimi_trt/assets/tiny-kimi/).

Three steps, so the expensive one runs where the compute is and needs almost nothing there:

  prepare  (CPU, here)  corpus -> domain BPE vocabulary -> token ids + loss masks (.npz),
                        model config, teacher-forced eval set. Needs kimi_trt.
  train    (GPU or CPU) torch + transformers + numpy + safetensors only: DeepseekV3ForCausalLM
                        from the prepared config, AdamW, warmup + cosine LR over a wall-clock
                        budget, DeepSeek's aux-loss-free balancing of the router bias, loss on
                        assistant tokens only. Stops by itself inside --minutes (and on
                        SIGTERM), evaluates, and writes bf16 safetensors + train_log.json.
  score    (GPU or CPU) teacher-forced exact calls of candidate weights on the dev set.
  export   (CPU, here)  trained weights -> a checkpoint laid out exactly like Kimi-K2's
                        (block-FP8 + scales, BF16 embeddings/norms/router, fp32 bias,
                        tokenizer files), verified against transformers on the float weights.

    python scripts/train_tiny_model.py prepare --out .gpu_carry/tiny-kimi-data
    python scripts/train_tiny_model.py train --data .gpu_carry/tiny-kimi-data --out OUT --minutes 8
    python scripts/train_tiny_model.py export --data .gpu_carry/tiny-kimi-data --weights OUT \\
        --out kimi_trt/assets/tiny-kimi
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="step", required=True)
    pr = sub.add_parser("prepare", help="corpus, vocabulary, token ids, config, eval set (CPU)")
    pr.add_argument("--out", required=True, help="data folder (carry it to the GPU machine)")
    pr.add_argument("--conversations", type=int, default=120_000)
    pr.add_argument("--vocab-size", type=int, default=2048, help="base BPE size (+256 specials)")
    pr.add_argument(
        "--vocab-sample", type=int, default=4000, help="conversations the BPE is trained on"
    )
    pr.add_argument(
        "--vocab-from",
        help="reuse this vocabulary (a data folder's vocab/ or a checkpoint) instead of training one",
    )
    pr.add_argument("--layers", type=int, default=3)
    pr.add_argument("--experts", type=int, default=8)
    pr.add_argument("--seed", type=int, default=0)
    tr = sub.add_parser("train", help="train for a wall-clock budget (torch + transformers only)")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument(
        "--minutes", type=float, required=True, help="whole run, setup and save included"
    )
    tr.add_argument("--reserve-s", type=float, default=25.0, help="kept for the final eval + save")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    tr.add_argument(
        "--batch-tokens", type=int, help="padded tokens per step [65536 on CUDA, 8192 on CPU]"
    )
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--lr-floor", type=float, default=0.05)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--weight-decay", type=float, default=0.05)
    tr.add_argument("--clip", type=float, default=1.0)
    tr.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias step per update")
    tr.add_argument(
        "--hide-prefix-fraction",
        type=float,
        default=0.5,
        help="share of the budget over which batches stop hiding the shared prompt prefix",
    )
    tr.add_argument(
        "--mirror-head-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start lm_head equal to the embeddings (see mirror_head_init)",
    )
    tr.add_argument(
        "--init-weights",
        nargs="+",
        help="continue from this earlier train --out (several: their average; same "
        "vocabulary; replaces --mirror-head-init)",
    )
    tr.add_argument(
        "--copy-weight",
        type=float,
        default=4.0,
        help="loss weight of targets copied from earlier in the dialogue (see Corpus.collate)",
    )
    tr.add_argument("--log-every-s", type=float, default=10.0)
    tr.add_argument("--eval-every-s", type=float, default=60.0)
    tr.add_argument(
        "--eval-cases", type=int, default=0, help="teacher-forced eval subset (0: all 300)"
    )
    tr.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder (off by default)"
    )
    tr.add_argument(
        "--max-steps", type=int, default=0, help="stop after this many steps (0: the budget only)"
    )
    tr.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser(
        "score", help="teacher-forced exact calls of candidate weights on the dev set"
    )
    sc.add_argument("--data", required=True)
    sc.add_argument(
        "--weights", required=True, nargs="+", help="train output(s); several: their average"
    )
    sc.add_argument("--set", choices=("dev", "eval"), default="dev")
    sc.add_argument("--device", default="auto")
    sc.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ex = sub.add_parser("export", help="write the Kimi-K2-format checkpoint (CPU)")
    ex.add_argument("--data", required=True)
    ex.add_argument(
        "--weights",
        required=True,
        nargs="+",
        help="folder with the train step's outputs (several: their weights' uniform average)",
    )
    ex.add_argument("--out", required=True)
    ex.add_argument(
        "--report",
        default=str(REPO / "bench" / "results" / "tiny_model_export.json"),
        help="where to write the FP8-vs-float comparison",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step in ("train", "score"):
        from kimi_trt.tinymodel import train

        getattr(train, args.step)(args)
        return
    from kimi_trt.errors import UserError
    from kimi_trt.tinymodel import export, prepare

    step = {"prepare": prepare.prepare, "export": export.export}[args.step]

    try:
        step(args)
    except UserError as e:  # a wrong folder or file: one line, the CLI's exit code (2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
