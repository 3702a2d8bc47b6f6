"""Kimi-K2's text format in one place: pre-tokenisation pattern, special tokens, tool markers.

The tokenizer, the small-vocabulary trainer, the chat template and the tool-call parser all
need the same facts (see ../shared/reference/kimi-k2.md). Keeping them here means a
checkpoint with a different base vocabulary size only changes ``base`` - names and
offsets stay those of Kimi-K2 (163584 base tokens, then 256 reserved ids).
"""

from __future__ import annotations

# The split pattern of Kimi-K2's tokenization_kimi.py. It uses class intersection (`&&`),
# which Python's `re` cannot compile; tiktoken's engine (fancy-regex) and the `regex`
# module in VERSION1 mode can.
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Named special tokens and their offset from the base vocabulary size (Kimi-K2: base 163584,
# so [BOS] = 163584 ... [PAD] = 163839). Unnamed offsets are `<|reserved_token_{id}|>`.
NAMED_SPECIAL_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[UNK]": 254,
    "[PAD]": 255,
}

# Kimi-K2's tokenizer_config.json marks the five tool-call markers `special: false` (they
# must survive `skip_special_tokens` so a parser can see them); all other names are special.
NON_SKIPPABLE_SPECIALS = frozenset(
    {
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    }
)

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
TOOL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)


def reserved_token_name(token_id: int) -> str:
    """Name of an unnamed reserved id, spelled as tokenization_kimi.py spells it."""
    return f"<|reserved_token_{token_id}|>"


def special_token_table(base: int, named: dict[int, str] | None = None) -> dict[str, int]:
    """All 256 special tokens (name -> id) placed after a base vocabulary of size `base`.

    `named` (id -> name, from a tokenizer_config.json's added_tokens_decoder) overrides the
    Kimi-K2 defaults; ids it does not name get Kimi-K2's name for that offset, or a
    reserved name.
    """
    by_offset = {offset: name for name, offset in NAMED_SPECIAL_OFFSETS.items()}
    table: dict[str, int] = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        token_id = base + offset
        if named and token_id in named:
            name = named[token_id]
        else:
            name = by_offset.get(offset, reserved_token_name(token_id))
        table[name] = token_id
    return table
