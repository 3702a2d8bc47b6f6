#!/usr/bin/env python3
"""Train a small byte-level BPE vocabulary in Kimi-K2's tokenizer format.

Writes OUT/tiktoken.model (tiktoken base64-rank file) and OUT/tokenizer_config.json
(Kimi-K2's special-token names after the base vocabulary, Kimi-K2's chat template).
The shipped kimi_trt/assets/small-vocab/ was made with the defaults:

    .venv/bin/python scripts/make_small_vocab.py --out kimi_trt/assets/small-vocab

A domain vocabulary: --corpus FILE --size N --out DIR (N = base size; vocab_size = N + 256).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kimi_trt.chat.bpe_trainer import builtin_corpus, train_bpe, write_vocab_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--corpus",
    type=click.Path(path_type=Path),
    help="UTF-8 text file to train on (default: a built-in deterministic mixed corpus).",
)
@click.option(
    "--size",
    type=int,
    default=1024,
    show_default=True,
    help="Base vocabulary size (256 byte tokens + merges); 256 special ids follow it.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in corpus.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
def main(corpus: Path | None, size: int, seed: int, out: Path) -> None:
    """Train a deterministic byte-level BPE and write it in Kimi-K2's tokenizer format."""
    if corpus is not None:
        if not corpus.is_file():
            _fail(f"--corpus {corpus}: no such file")
        try:
            text = corpus.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            _fail(f"--corpus {corpus}: not UTF-8 text ({e.reason} at byte {e.start})")
    else:
        text = builtin_corpus(seed)
    try:
        vocab = train_bpe(text, size)
    except ValueError as e:
        _fail(f"{corpus or 'built-in corpus'}: {e}")
    write_vocab_dir(vocab, out)
    click.echo(f"wrote {out}/tiktoken.model ({size} base tokens, vocab_size {size + 256})")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
