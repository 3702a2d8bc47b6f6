"""The tiny model's `prepare` step (CPU): corpus -> what the train step needs, and nothing more.

A domain BPE vocabulary, token ids + assistant-only loss masks, the model config and the
teacher-forced dev/eval sets, so the GPU machine needs only torch and transformers.

Loss masks come from the chat template itself: for each assistant turn, the text rendered
up to the generation prompt is context and what the turn adds after it is target, so the
masks can never disagree with how prompts are rendered at inference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kimi_trt.chat.bpe_trainer import train_bpe, write_vocab_dir
from kimi_trt.chat.kimi_format import ARGUMENT_BEGIN, CALL_END
from kimi_trt.chat.template import render_chat
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.config import ModelConfig
from kimi_trt.convert.synth import TINY_ROPE_SCALING, preset_config
from kimi_trt.errors import CheckpointError, ConfigError
from kimi_trt.mapping import Mapping, layout_problems
from kimi_trt.testing.hf_reference import (
    transformers_config,
)
from kimi_trt.tinymodel.corpus import (
    Conversation,
    EvalCase,
    dev_cases,
    eval_cases,
    training_conversations,
)

# Layouts the tiny model must split into (TP4 attention x MoE TP2 x EP2, and the 2-rank ones).
REQUIRED_LAYOUTS = (Mapping(4, 4, 2, 2), Mapping(2, 2, 1, 2), Mapping(2, 2, 2, 1))
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")
# Pinned here (not inherited from the synthetic "tiny" preset) so a later preset change
# cannot silently alter the trained model's shapes.
TINY_SHAPES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "initializer_range": 0.05,
    "max_position_embeddings": 2048,
    "rope_scaling": TINY_ROPE_SCALING,
}


def tiny_model_config(vocab_size: int, base: int, layers: int, experts: int) -> ModelConfig:
    """Kimi-K2's config with tiny sizes. Hidden 256 and 8 heads of 128/64 dims keep every
    per-rank shard on 128-blocks under TP4; init range 0.05 and 64 rope dims help the
    induction-like copying the task needs (reference/tiny-model-trials.md)."""
    cfg = preset_config(
        "tiny",
        layers=layers,
        experts=experts,
        vocab=vocab_size,
        overrides={**TINY_SHAPES, "bos_token_id": base, "eos_token_id": base + 1},
    )
    problems = [p for m in REQUIRED_LAYOUTS for p in layout_problems(cfg, m)]
    if problems:
        raise ConfigError("tiny model cannot be split: " + "; ".join(problems))
    return cfg


def transformers_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The DeepseekV3Config fields the training step rebuilds the model from (JSON-safe).

    YaRN is given both as transformers 5's `rope_parameters` and the older `rope_scaling`
    + `rope_theta`, so whichever transformers the GPU machine has builds the same rope;
    `expected_rope` lets the training step prove it did."""
    d = transformers_config(cfg).to_dict()
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
    d["rope_scaling"] = dict(d["rope_parameters"])
    d["rope_theta"] = cfg.rope_theta
    d["expected_rope"] = {"inv_freq": cfg.rope_inv_freq(), "softmax_scale": cfg.softmax_scale}
    return d


def conversation_ids(
    conv: Conversation, tok: KimiTokenizer, template: str
) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and, per token, whether it is assistant output."""

    def render(messages: list, generation_prompt: bool) -> str:
        return render_chat(
            messages, tools=conv.tools, add_generation_prompt=generation_prompt, template=template
        )

    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        prompt = render(conv.messages[:i], True)
        full = render(conv.messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConfigError("chat template is not prefix-consistent; cannot mask assistant turns")
        for text, target in ((prompt[len(done) :], False), (full[len(prompt) :], True)):
            piece = tok.encode(text)
            ids += piece
            mask += [target] * len(piece)
        done = full
    return ids, mask


def _pack(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sequences])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.uint16, count=int(offsets[-1]))
    return flat, offsets


def write_case_set(
    tok: KimiTokenizer, template: str, cases: list[EvalCase], path: Path
) -> dict[str, int]:
    """Prompts + the exact expected tool-call turn of every case that needs a tool (the
    teacher-forced sets: eval.npz from eval_cases, dev.npz from dev_cases)."""
    cases = [c for c in cases if c.expected_tool is not None]
    names = list(dict.fromkeys(c.split for c in cases))
    seqs, starts, splits = [], [], []
    for case in cases:
        call = {"name": case.expected_tool, "arguments": json.dumps(case.expected_args)}
        reply = {"role": "assistant", "content": "", "tool_calls": [{"id": "x", "function": call}]}
        prompt = render_chat(case.messages, tools=case.tools, template=template)
        full = render_chat(
            case.messages + [reply],
            tools=case.tools,
            add_generation_prompt=False,
            template=template,
        )
        prompt_ids, reply_ids = tok.encode(prompt), tok.encode(full[len(prompt) :])
        seqs.append(prompt_ids + reply_ids)
        starts.append(len(prompt_ids))
        splits.append(names.index(case.split))
    tokens, offsets = _pack(seqs)
    np.savez_compressed(
        path,
        tokens=tokens.astype(np.int64),
        offsets=offsets,
        completion_starts=np.array(starts),
        splits=np.array(splits),
        split_names=np.array(names),
    )
    return {n: splits.count(k) for k, n in enumerate(names)}


def _train_vocab(conversations: list[Conversation], size: int, out: Path) -> KimiTokenizer:
    text = "".join(
        render_chat(c.messages, tools=c.tools, add_generation_prompt=False) for c in conversations
    )
    write_vocab_dir(train_bpe(text, size, detach_name_marks=True), out)
    return KimiTokenizer.from_dir(out)


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """The vocabulary files of `src` (a data folder's vocab/ or a checkpoint) into `out`: for
    new data that must keep a model's token ids, and for the exported checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            raise CheckpointError(f"{src}: no {name} (expected a vocab/ folder or a checkpoint)")
        shutil.copyfile(src / name, out / name)


def tokenise_corpus(convs, tok: KimiTokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint16 tokens, int64 offsets, bool mask) of all conversations, built in chunks so a
    million conversations stay a few hundred MB."""
    chunks_ids, chunks_mask, lengths = [], [], []
    ids_buf: list[int] = []
    mask_buf: list[bool] = []
    for n, conv in enumerate(tqdm(convs, desc="tokenise", unit="conv", mininterval=5)):
        ids, mask = conversation_ids(conv, tok, tok.chat_template)
        ids_buf += ids
        mask_buf += mask
        lengths.append(len(ids))
        if len(ids_buf) > 1_000_000 or n == len(convs) - 1:
            chunks_ids.append(np.array(ids_buf, dtype=np.uint16))
            chunks_mask.append(np.array(mask_buf, dtype=bool))
            ids_buf, mask_buf = [], []
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return np.concatenate(chunks_ids), offsets, np.concatenate(chunks_mask)


def prepare(args) -> None:
    """Vocabulary, token ids, masks, configs and eval set into args.out (see module doc)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = list(training_conversations(args.seed, args.conversations))
    if args.vocab_from:
        copy_tokenizer_files(Path(args.vocab_from), out / "vocab")
        tok = KimiTokenizer.from_dir(out / "vocab")
    else:
        tok = _train_vocab(convs[: args.vocab_sample], args.vocab_size, out / "vocab")
    if tok.vocab_size > 2**16:
        raise ConfigError(f"vocab_size {tok.vocab_size} does not fit the uint16 token file")
    tokens, offsets, mask = tokenise_corpus(convs, tok)
    span = [tok.special_ids[marker] for marker in (ARGUMENT_BEGIN, CALL_END)]
    np.savez_compressed(
        out / "corpus.npz",
        tokens=tokens,
        offsets=offsets,
        mask_bits=np.packbits(mask),
        argument_span=np.array(span),
    )
    cfg = tiny_model_config(tok.vocab_size, tok.base_vocab_size, args.layers, args.experts)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    (out / "hf_config.json").write_text(json.dumps(transformers_config_dict(cfg), indent=2))
    eval_counts = write_case_set(tok, tok.chat_template, eval_cases(), out / "eval.npz")
    dev_counts = write_case_set(tok, tok.chat_template, dev_cases(), out / "dev.npz")
    lengths = np.diff(offsets)
    stats = {
        "conversations": len(convs),
        "tokens": int(len(tokens)),
        "assistant_tokens": int(mask.sum()),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
        "vocab_size": tok.vocab_size,
        "eval_cases": eval_counts,
        "dev_cases": dev_counts,
        "seed": args.seed,
    }
    (out / "prepare.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
