"""A small, deterministic byte-level BPE trainer that writes Kimi-K2's tokenizer file format.

The real `tiktoken.model` (163584 tokens) is not available here, so tests and the tiny
models use a vocabulary trained by this module: the first 256 ranks are the single bytes,
each later rank is the concatenation of two earlier tokens (so tiktoken's rank-ordered
merging reaches it), and the 256 special tokens follow with Kimi-K2's names and offsets.
Training splits text with Kimi's own pre-tokenisation pattern, so the merges it learns are
the kind tiktoken will apply at encode time.

Determinism: the same corpus and size always give byte-identical files (ties between
equally frequent pairs are broken by the smaller token ids).
"""

from __future__ import annotations

import base64
import heapq
import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from kimi_trt.chat.kimi_format import (
    KIMI_PAT_STR,
    NON_SKIPPABLE_SPECIALS,
    special_token_table,
)

CHAT_TEMPLATE_PATH = (
    Path(__file__).resolve().parent.parent / "assets" / "kimi_k2_chat_template.jinja"
)
Pair = tuple[int, int]


_MARKED_NAME = regex.compile(r"^([^\p{L}\p{N}])(\p{Lu}.*)$", regex.V1 | regex.S)


def pretokenize(text: str, detach_name_marks: bool = False) -> Counter[bytes]:
    """Count the pre-tokens of `text` (UTF-8 bytes) under Kimi's split pattern.

    With `detach_name_marks`, a capitalised word's leading mark (" Paris", '"Paris') is
    counted apart from the word, so no merge ever joins them: the word then encodes to the
    same tokens after a space as inside a JSON string, and copying a name from prose into
    tool-call arguments is copying token ids (what a tiny model can learn)."""
    pattern = regex.compile(KIMI_PAT_STR, regex.V1)
    counts: Counter[bytes] = Counter()
    for piece in pattern.findall(text):
        marked = _MARKED_NAME.match(piece) if detach_name_marks else None
        for part in marked.groups() if marked else (piece,):
            counts[part.encode("utf-8")] += 1
    return counts


class _PairStats:
    """Pair counts over the word table, updated incrementally as merges rewrite words."""

    def __init__(self, words: list[list[int]], counts: list[int]):
        self.words = words
        self.counts = counts
        self.pair_count: Counter[Pair] = Counter()
        self.where: dict[Pair, set[int]] = {}
        self.heap: list[tuple[int, int, int]] = []
        for index, word in enumerate(words):
            self._add_word(index, word, +1)
        for pair, count in self.pair_count.items():
            heapq.heappush(self.heap, (-count, pair[0], pair[1]))

    def _add_word(self, index: int, word: list[int], sign: int) -> set[Pair]:
        touched = set()
        for pair in zip(word, word[1:], strict=False):
            self.pair_count[pair] += sign * self.counts[index]
            if sign > 0:
                self.where.setdefault(pair, set()).add(index)
            touched.add(pair)
        return touched

    def best_pair(self) -> Pair | None:
        """The most frequent pair (ties: smallest ids), skipping stale heap entries."""
        while self.heap:
            neg, a, b = heapq.heappop(self.heap)
            if self.pair_count.get((a, b), 0) == -neg and -neg > 0:
                return (a, b)
        return None

    def merge(self, pair: Pair, new_id: int) -> None:
        """Replace every occurrence of `pair` by `new_id` and refresh the affected counts."""
        touched: set[Pair] = set()
        for index in sorted(self.where.pop(pair, ())):
            word = self.words[index]
            merged = _merge_word(word, pair, new_id)
            if merged is word:
                continue
            touched |= self._add_word(index, word, -1)
            touched |= self._add_word(index, merged, +1)
            self.words[index] = merged
        for touched_pair in sorted(touched):
            count = self.pair_count.get(touched_pair, 0)
            if count > 0:
                heapq.heappush(self.heap, (-count, touched_pair[0], touched_pair[1]))


def _merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """`word` with each non-overlapping left-to-right occurrence of `pair` merged (same list if none)."""
    out: list[int] = []
    i = 0
    found = False
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
            found = True
        else:
            out.append(word[i])
            i += 1
    return out if found else word


def train_bpe(text: str, size: int, detach_name_marks: bool = False) -> list[bytes]:
    """Train a byte-level BPE on `text`; return the tokens in rank order (len == size).
    `detach_name_marks`: see `pretokenize`.

    Raises ValueError when `size` < 257 or the corpus cannot provide enough distinct merges.
    """
    if size <= 256:
        raise ValueError(f"vocabulary size must be > 256 (the single bytes), got {size}")
    words_counter = pretokenize(text, detach_name_marks)
    ordered = sorted(words_counter.items())
    stats = _PairStats([list(word) for word, _ in ordered], [count for _, count in ordered])
    vocab = [bytes([i]) for i in range(256)]
    ids = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < size:
        pair = stats.best_pair()
        if pair is None:
            raise ValueError(
                f"corpus too small: only {len(vocab)} tokens learnable, {size} requested"
            )
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ids:
            ids[token] = len(vocab)
            vocab.append(token)
        stats.merge(pair, ids[token])
    return vocab


def tiktoken_file_text(vocab: Iterable[bytes]) -> str:
    """tiktoken's rank file: `base64(token) rank` per line, in rank order."""
    return "".join(
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab)
    )


def tokenizer_config(base: int, chat_template: str, max_length: int = 131072) -> dict:
    """A tokenizer_config.json shaped like Kimi-K2's, for a base vocabulary of size `base`."""
    table = special_token_table(base)
    named = {name: i for name, i in table.items() if not name.startswith("<|reserved_token_")}
    decoder = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in NON_SKIPPABLE_SPECIALS,
        }
        for name, i in sorted(named.items(), key=lambda kv: kv[1])
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "[EOT]",
            "<|im_system|>",
            "<|im_middle|>",
        ],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "tokenizer_class": "TikTokenTokenizer",
        "chat_template": chat_template,
    }


def write_vocab_dir(vocab: list[bytes], out: Path) -> None:
    """Write `tiktoken.model` + `tokenizer_config.json` (Kimi-K2's chat template) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    config = tokenizer_config(len(vocab), template)
    (out / "tiktoken.model").write_text(tiktoken_file_text(vocab), encoding="ascii")
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


_ENGLISH = (
    "the model reads a checkpoint and writes one engine per rank . "
    "tokens flow from the prompt through every layer to the sampler . "
    "What's the weather like in Beijing today ? Let me check using the tool . "
    "It is sunny and warm , with a light breeze from the north . "
    "The quick brown fox jumps over the lazy dog while the cat sleeps . "
    "Experts are routed by a sigmoid gate ; the shared expert always runs . "
    "Please summarise the following document in three short sentences . "
    "I can't find the file you mentioned , could you send it again ? "
    "They've finished the build and we'll run the tests tomorrow morning . "
    "Streaming responses arrive as small deltas that the client joins together ."
).split()
_CHINESE = "你好 世界 今天 北京 天气 晴朗 我们 模型 工具 调用 查询 城市 温度 问题 回答 谢谢".split()
_CODE = [
    "def main():\n    return 0\n",
    "for i in range(10):\n    print(i)\n",
    "if x is None:\n    raise ValueError('missing')\n",
    "import json\nresult = json.loads(text)\n",
]
_JSON_KEYS = ["city", "query", "location", "unit", "limit", "path", "content", "date", "id"]
_JSON_VALUES = ["Beijing", "Shanghai", "celsius", "San Francisco", "report.md", "2025-07-11", "42"]
_NAMES = ["get_weather", "search", "read_file", "send_message", "calculate"]


def builtin_corpus(seed: int = 0, sentences: int = 6000) -> str:
    """A deterministic mixed corpus: English, Chinese, code, numbers, tool-call JSON."""
    rng = random.Random(seed)
    parts: list[str] = []
    for _ in range(sentences):
        kind = rng.random()
        if kind < 0.55:
            words = [rng.choice(_ENGLISH) for _ in range(rng.randint(5, 14))]
            sentence = " ".join(words)
            parts.append(sentence[0].upper() + sentence[1:] + ".\n")
        elif kind < 0.7:
            parts.append("".join(rng.choice(_CHINESE) for _ in range(rng.randint(3, 8))) + "。\n")
        elif kind < 0.8:
            parts.append(rng.choice(_CODE))
        elif kind < 0.9:
            keys = rng.sample(_JSON_KEYS, rng.randint(1, 3))
            body = {k: rng.choice(_JSON_VALUES) for k in keys}
            name = rng.choice(_NAMES)
            parts.append(f"functions.{name}:{rng.randint(0, 3)} {json.dumps(body)}\n")
        else:
            parts.append(
                " ".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(2, 6))) + "\n"
            )
    return "".join(parts)
