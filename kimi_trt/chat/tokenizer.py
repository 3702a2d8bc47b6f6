"""Kimi-K2's tokenizer: tiktoken BPE + Kimi's split pattern + 256 special ids after the base.

A checkpoint ships `tiktoken.model` (one `base64(token) rank` line per token) and
`tokenizer_config.json` (special-token names in `added_tokens_decoder`, the chat
template). Kimi-K2's own `tokenization_kimi.py` needs `trust_remote_code`; this module
reproduces its behaviour without running checkpoint code:

- base vocabulary = the rank file (163584 tokens for Kimi-K2), then 256 special ids with
  Kimi-K2's names and offsets ([BOS] = base, [EOS] = base+1, <|im_end|> = base+2, ...,
  [PAD] = base+255; unnamed ids are `<|reserved_token_{id}|>`);
- encode splits very long whitespace / non-whitespace runs first (as Kimi does) so
  tiktoken never sees a pathological piece, and by default lets special-token text
  become special ids (Kimi's default, for raw prompts);
- a chat prompt gets special ids only for the markers its template writes: message,
  tool-result and tool-definition text is encoded with special tokens disallowed, so
  text spelling `<|im_end|>` cannot forge a turn (`render_chat_parts` in template.py);
- chat turns end with <|im_end|> while config.json's eos is [EOS]: `eos_token_ids` has both.

`IncrementalDetokenizer` turns a stream of ids into text deltas without ever splitting a
UTF-8 character; the concatenated deltas equal `decode(all ids)`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import tiktoken

from kimi_trt.chat.kimi_format import (
    KIMI_PAT_STR,
    NON_SKIPPABLE_SPECIALS,
    NUM_RESERVED_SPECIAL_TOKENS,
    TOOL_MARKERS,
    special_token_table,
)
from kimi_trt.chat.template import DEFAULT_CHAT_TEMPLATE, render_chat_parts
from kimi_trt.errors import CheckpointError, ConfigError, UserError
from kimi_trt.json_files import read_json

SMALL_VOCAB_DIR = Path(__file__).resolve().parent.parent / "assets" / "small-vocab"

# tokenization_kimi.py's limits: tiktoken is slow (and used to panic) on very long runs of
# whitespace or non-whitespace, so such runs are cut before encoding.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file; ranks must be exactly 0..N-1 (special ids start at N)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found (expected tiktoken.model)")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank_text = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank_text)
            except (ValueError, binascii.Error):
                raise CheckpointError(
                    f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not unique and contiguous 0..{len(ranks) - 1}")
    return ranks


def _read_config(path: Path) -> dict:
    """tokenizer_config.json ({} when absent), read with `json_files`: malformed, not UTF-8,
    nested too deep or not an object is one ConfigError line naming the file - a tokenizer
    dir is user input, and the server loads it at startup."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (expected tokenizer_config.json)")
    config = read_json(path, ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def _named_specials(config: dict, base: int, source: Path) -> tuple[dict[int, str], set[str]]:
    """added_tokens_decoder -> (id -> name, names whose `special` flag is false). Every
    entry's key and fields are checked for type, so a wrong one is named here instead of
    surfacing as an AttributeError or a misleading "special token missing" later."""
    table = config.get("added_tokens_decoder")
    if table is None:
        return {}, set()
    if not isinstance(table, dict):
        raise ConfigError(
            f"{source}: 'added_tokens_decoder' must be an object of id -> token, "
            f"got a JSON {type(table).__name__}"
        )
    named: dict[int, str] = {}
    not_special: set[str] = set()
    for key, entry in table.items():
        where = f"{source}: added_tokens_decoder[{key!r}]"
        if not (key.isascii() and key.isdecimal()):
            raise ConfigError(f"{where}: the key must be a decimal token id")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ConfigError(f"{where} needs a 'content' string")
        token_id, name = int(key), entry["content"]
        if not name:
            raise ConfigError(f"{where}: 'content' is empty")
        if not base <= token_id < base + NUM_RESERVED_SPECIAL_TOKENS:
            raise ConfigError(
                f"{source}: added token {name!r} has id {token_id}, expected "
                f"{base}..{base + NUM_RESERVED_SPECIAL_TOKENS - 1} (after the {base}-token base vocabulary)"
            )
        special = entry.get("special")
        if special is None:  # absent or null: special, as transformers reads it
            special = True
        if not isinstance(special, bool):
            raise ConfigError(f"{where}: 'special' must be true or false, got {special!r:.40}")
        named[token_id] = name
        if not special:
            not_special.add(name)
    return named, not_special


def _split_long_runs(text: str) -> Iterable[str]:
    """Cut `text` so no piece holds more than _MAX_RUN_CHARS consecutive (non-)whitespace chars."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        block = text[start : start + _MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(block):
            for pos in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield block[cut:pos]
                cut = pos
        yield block[cut:]


def _chat_template(path: Path, config: dict) -> str | None:
    """The checkpoint's template: chat_template.jinja (newer releases) or tokenizer_config.json's."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        if not jinja_file.is_file():
            raise ConfigError(f"{jinja_file}: not a regular file (expected a Jinja template)")
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{jinja_file}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{jinja_file}: cannot read ({e.strerror})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named-templates form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConfigError(
            f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list with a 'default' entry"
        )
    return template


class KimiTokenizer:
    """Encode/decode with a Kimi-format vocabulary; see the module docstring for the layout."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        *,
        named_specials: dict[int, str] | None = None,
        not_special: Iterable[str] = NON_SKIPPABLE_SPECIALS,
        chat_template: str | None = None,
        name: str = "kimi",
    ):
        self.base_vocab_size = len(ranks)
        self.special_ids: dict[str, int] = special_token_table(self.base_vocab_size, named_specials)
        if len(self.special_ids) != NUM_RESERVED_SPECIAL_TOKENS:
            raise ConfigError(f"{name}: special token names are not unique")
        for required in ("[BOS]", "[EOS]", "<|im_end|>", *TOOL_MARKERS):
            if required not in self.special_ids:
                raise ConfigError(f"{name}: special token {required!r} is missing")
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )
        self.id_to_special = {i: n for n, i in self.special_ids.items()}
        kept = set(not_special)
        self._skippable = frozenset(i for n, i in self.special_ids.items() if n not in kept)
        self.has_own_chat_template = chat_template is not None
        self.chat_template: str = chat_template or DEFAULT_CHAT_TEMPLATE

    @classmethod
    def from_dir(cls, path: str | Path) -> KimiTokenizer:
        """Load `tiktoken.model` (+ optional `tokenizer_config.json`, `chat_template.jinja`)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: not a directory (expected a checkpoint with tiktoken.model)"
            )
        ranks = read_tiktoken_ranks(path / "tiktoken.model")
        config_path = path / "tokenizer_config.json"
        config = _read_config(config_path)
        named, not_special = _named_specials(config, len(ranks), config_path)
        return cls(
            ranks,
            named_specials=named,
            not_special=not_special if named else NON_SKIPPABLE_SPECIALS,
            chat_template=_chat_template(path, config),
            name=str(path),
        )

    @classmethod
    def small(cls) -> KimiTokenizer:
        """The packaged 1024+256 vocabulary (tests, tiny synthetic models)."""
        return cls.from_dir(SMALL_VOCAB_DIR)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding (base ranks + special tokens), e.g. for a grammar engine."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def bos_token_id(self) -> int:
        return self.special_ids["[BOS]"]

    @property
    def eos_token_id(self) -> int:
        return self.special_ids["[EOS]"]

    @property
    def pad_token_id(self) -> int:
        return self.special_ids["[PAD]"] if "[PAD]" in self.special_ids else self.eos_token_id

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Stop ids: config.json's [EOS] and the turn end <|im_end|>."""
        return (self.special_ids["[EOS]"], self.special_ids["<|im_end|>"])

    @cached_property
    def tool_marker_ids(self) -> dict[int, str]:
        """id -> marker text for the five tool-call markers (the parser's token mode)."""
        return {self.special_ids[m]: m for m in TOOL_MARKERS}

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. allow_special=False encodes special-token text as plain text."""
        ids: list[int] = []
        for piece in _split_long_runs(text):
            if allow_special:
                ids.extend(self._enc.encode(piece, allowed_special="all"))
            else:
                ids.extend(self._enc.encode(piece, disallowed_special=()))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (special tokens: their name in UTF-8)."""
        if not 0 <= token_id < self.vocab_size:
            raise UserError(
                f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}"
            )
        return self._enc.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        if skip_special:
            ids = [i for i in ids if i not in self._skippable]
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. skip_special keeps the tool markers."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def detokenizer(self, *, skip_special: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special=skip_special)

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        *,
        tools: Sequence[dict] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs,
    ) -> list[int] | str:
        """Render with this checkpoint's template (or Kimi-K2's) and, by default, encode:
        the template's markers become special ids, all other text is encoded as text."""
        parts = render_chat_parts(
            messages,
            special_names=self.special_ids,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template=self.chat_template,
            **template_kwargs,
        )
        if not tokenize:
            return "".join(parts)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.encode(part, allow_special=False))
        return ids


class IncrementalDetokenizer:
    """Streaming id -> text: `feed(ids)` returns only complete characters, `flush()` the rest.

    Bytes of a character split across tokens are held back until it is complete; bytes that
    can never form a character become U+FFFD, exactly as `KimiTokenizer.decode` does.
    """

    def __init__(self, tokenizer: KimiTokenizer, *, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = tokenizer._skippable if skip_special else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add token id(s); return the newly completed text (may be empty)."""
        if isinstance(ids, int):
            ids = (ids,)
        data = b"".join(self._tok.token_bytes(i) for i in ids if i not in self._skip)
        delta = self._decoder.decode(data)
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of stream: return what is left (an incomplete character becomes U+FFFD)."""
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta
