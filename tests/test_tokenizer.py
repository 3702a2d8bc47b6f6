"""KimiTokenizer: file format, Kimi's special-token layout, encode/decode, streaming detokenisation,
and the small-vocabulary trainer that produced kimi_trt/assets/small-vocab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_trt.chat.bpe_trainer import (
    builtin_corpus,
    tiktoken_file_text,
    tokenizer_config,
    train_bpe,
    write_vocab_dir,
)
from kimi_trt.chat.kimi_format import KIMI_PAT_STR, TOOL_MARKERS
from kimi_trt.chat.template import DEFAULT_CHAT_TEMPLATE
from kimi_trt.chat.tokenizer import (
    SMALL_VOCAB_DIR,
    KimiTokenizer,
    _split_long_runs,
    read_tiktoken_ranks,
)
from kimi_trt.convert.synth import preset_config
from kimi_trt.errors import CheckpointError, ConfigError, UserError
from tests.conftest import K2_CONFIG, REPO, cli_env

# The ids Kimi-K2's tokenizer_config.json documents (../shared/reference/kimi-k2.md).
K2_DOCUMENTED_IDS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "[UNK]": 163838,
    "[PAD]": 163839,
}


@pytest.fixture(scope="module")
def tok() -> KimiTokenizer:
    return KimiTokenizer.small()


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory) -> Path:
    """A tokenizer dir with Kimi-K2's base size (163584 tokens; merges are fake but unique)."""
    out = tmp_path_factory.mktemp("k2tok")
    vocab = [bytes([i]) for i in range(256)] + [b"<fake%d>" % i for i in range(163584 - 256)]
    (out / "tiktoken.model").write_text(tiktoken_file_text(vocab), encoding="ascii")
    return out


@pytest.mark.parametrize("with_config", [True, False])
def test_special_ids_match_kimi_k2_for_a_163584_base(k2_dir, with_config):
    config = k2_dir / "tokenizer_config.json"
    if with_config:
        config.write_text(json.dumps(tokenizer_config(163584, DEFAULT_CHAT_TEMPLATE)))
    elif config.exists():
        config.unlink()
    tok = KimiTokenizer.from_dir(k2_dir)
    k2 = json.loads(K2_CONFIG.read_text())
    assert tok.vocab_size == k2["vocab_size"] == 163840
    assert (tok.bos_token_id, tok.eos_token_id) == (k2["bos_token_id"], k2["eos_token_id"])
    assert {n: tok.special_ids[n] for n in K2_DOCUMENTED_IDS} == K2_DOCUMENTED_IDS
    assert tok.special_ids["<|reserved_token_163589|>"] == 163589
    assert sorted(tok.special_ids.values()) == list(range(163584, 163840))
    assert tok.eos_token_ids == (163585, 163586)
    for name, token_id in K2_DOCUMENTED_IDS.items():
        assert tok.encode(name) == [token_id] and tok.decode([token_id]) == name


def test_small_vocab_matches_the_tiny_preset(tok):
    tiny = preset_config("tiny")
    assert tok.base_vocab_size == 1024
    assert tok.vocab_size == tiny.vocab_size == 1280
    assert (tok.bos_token_id, tok.eos_token_id) == (tiny.bos_token_id, tiny.eos_token_id)
    assert tok.special_ids["<|im_end|>"] == 1026 and tok.special_ids["[PAD]"] == 1279
    assert tok.has_own_chat_template and tok.chat_template == DEFAULT_CHAT_TEMPLATE


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_encode_decode_round_trip_random_unicode(tok, text):
    ids = tok.encode(text, allow_special=False)
    assert all(0 <= i < tok.base_vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text


def _reference_bpe(tok: KimiTokenizer, text: str) -> list[int]:
    """Independent encoder: `regex` (VERSION1) pre-tokenisation + rank-ordered pair merging."""
    ranks = read_tiktoken_ranks(SMALL_VOCAB_DIR / "tiktoken.model")
    ids: list[int] = []
    for piece in regex.findall(KIMI_PAT_STR, text, flags=regex.V1):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            merged = [ranks.get(a + b, 1 << 30) for a, b in zip(parts, parts[1:], strict=False)]
            best = min(range(len(merged)), key=merged.__getitem__)
            if merged[best] == 1 << 30:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(
            list("abcXYZ 'sdlltrve\n\t.,!?{}\":0123456789") + list("你好世界") + ["é", "ß", "😀"]
        ),
        max_size=80,
    )
)
def test_kimi_split_pattern_with_class_intersection(tok, text):
    """tiktoken runs Kimi's `&&` pattern the same way the `regex` module does (Han split apart)."""
    assert tok.encode(text, allow_special=False) == _reference_bpe(tok, text)


def test_han_is_split_from_latin(tok):
    pieces = regex.findall(KIMI_PAT_STR, "abc你好世界Def's 12345", flags=regex.V1)
    assert pieces == ["abc", "你好世界", "Def's", " ", "123", "45"]


def test_special_text_is_plain_text_unless_allowed(tok):
    assert tok.encode("<|im_end|>") == [1026]
    plain = tok.encode("<|im_end|>", allow_special=False)
    assert 1026 not in plain and tok.decode(plain) == "<|im_end|>"


def test_skip_special_keeps_tool_markers(tok):
    ids = [tok.bos_token_id, *tok.encode("hi"), *(tok.special_ids[m] for m in TOOL_MARKERS)]
    ids.append(tok.special_ids["<|im_end|>"])
    assert tok.decode(ids, skip_special=True) == "hi" + "".join(TOOL_MARKERS)
    assert tok.decode(ids).startswith("[BOS]hi")


def test_long_runs_are_split_but_round_trip(tok):
    text = " " * 60_000 + "x" * 30_000 + "\n"
    pieces = list(_split_long_runs(text))
    assert "".join(pieces) == text and len(pieces) == 4
    assert all(len(run) <= 25_000 for p in pieces for run in regex.findall(r"\s+|\S+", p))
    assert tok.decode(tok.encode(text)) == text


def test_bad_ids_are_user_errors(tok):
    with pytest.raises(UserError, match="1280 is outside the vocabulary 0..1279"):
        tok.decode([1280])


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=1279), max_size=40), data=st.data())
def test_incremental_detokenizer_equals_decode(tok, ids, data):
    detok = tok.detokenizer()
    deltas = []
    pos = 0
    while pos < len(ids):
        step = data.draw(st.integers(min_value=1, max_value=4))
        deltas.append(detok.feed(ids[pos : pos + step]))
        pos += step
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids) == detok.text


def test_incremental_detokenizer_never_splits_a_character(tok):
    text = "a😀北é"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    deltas = [detok.feed(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    for delta in deltas:
        assert "\ufffd" not in delta
    assert len(ids) > len(text)  # multi-byte characters really span several tokens here


def test_from_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        KimiTokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        KimiTokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("AA== 0\nnot-base64!! x\n")
    with pytest.raises(CheckpointError, match=r"tiktoken.model:2: expected 'base64token rank'"):
        KimiTokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("AA== 0\nAQ== 5\n")
    with pytest.raises(CheckpointError, match="contiguous"):
        KimiTokenizer.from_dir(tmp_path)
    write_vocab_dir([bytes([i]) for i in range(256)], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["9"] = {"content": "<|x|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'<\|x\|>' has id 9, expected 256..511"):
        KimiTokenizer.from_dir(tmp_path)


def _with_decoder(**entries):
    """A tokenizer_config edit: added_tokens_decoder with `entries` (key -> entry) added."""
    return lambda c: {**c, "added_tokens_decoder": {**c["added_tokens_decoder"], **entries}}


DEEP = b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


@pytest.mark.parametrize(
    "name, change, fragment",
    [
        ("tokenizer_config.json", DEEP, "malformed JSON (nested too deeply)"),
        ("tokenizer_config.json", b"{", "malformed JSON at line 1"),
        ("tokenizer_config.json", b'{"a": "\xff"}', "not UTF-8 text"),
        ("tokenizer_config.json", b"[]", "expected a JSON object"),
        (
            "tokenizer_config.json",
            lambda c: {**c, "added_tokens_decoder": [1, 2]},
            "'added_tokens_decoder' must be an object of id -> token, got a JSON list",
        ),
        (
            "tokenizer_config.json",
            _with_decoder(**{"256": {"content": 5}}),
            "added_tokens_decoder['256'] needs a 'content' string",
        ),
        (
            "tokenizer_config.json",
            _with_decoder(**{"256": {"content": ["[BOS]"]}}),
            "added_tokens_decoder['256'] needs a 'content' string",
        ),
        (
            "tokenizer_config.json",
            _with_decoder(**{"300": {"content": ""}}),
            "added_tokens_decoder['300']: 'content' is empty",
        ),
        (
            "tokenizer_config.json",
            _with_decoder(**{"256": {"content": "[BOS]", "special": "no"}}),
            "added_tokens_decoder['256']: 'special' must be true or false",
        ),
        (
            "tokenizer_config.json",
            _with_decoder(**{"3_00": {"content": "<|x|>"}}),
            "added_tokens_decoder['3_00']: the key must be a decimal token id",
        ),
        ("chat_template.jinja", b"\xff\xfe", "not UTF-8 text (byte 0)"),
        ("chat_template.jinja", "a directory", "not a regular file"),
        ("tokenizer_config.json", "a directory", "not a regular file"),
    ],
    ids=[
        "nested-10000-deep",
        "malformed",
        "not-utf8",
        "a-list",
        "added_tokens_decoder-a-list",
        "content-an-int",
        "content-a-list",
        "content-empty",
        "special-a-string",
        "key-3_00",
        "jinja-not-utf8",
        "jinja-a-directory",
        "config-a-directory",
    ],
)
def test_a_broken_tokenizer_file_is_one_line_naming_file_and_key(tmp_path, name, change, fragment):
    """Every file from_dir reads besides tiktoken.model: broken JSON (json_files), wrong types
    or a file that is not a file is one ConfigError line starting with the file's path. (An
    empty special-token name used to load, then hang tiktoken's encode forever.)"""
    write_vocab_dir([bytes([i]) for i in range(256)], tmp_path)
    path = tmp_path / name
    if change == "a directory":
        path.unlink(missing_ok=True)
        path.mkdir()
    elif callable(change):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_bytes(change)
    with pytest.raises(ConfigError) as e:
        KimiTokenizer.from_dir(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg, msg


def test_checkpoint_chat_template_is_used(tmp_path):
    write_vocab_dir([bytes([i]) for i in range(256)], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = KimiTokenizer.from_dir(tmp_path)
    hi = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(hi, tokenize=False) == "[hi]"
    config["chat_template"] = [{"name": "default", "template": "<{{ messages[0].content }}>"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert KimiTokenizer.from_dir(tmp_path).apply_chat_template(hi, tokenize=False) == "<hi>"
    (tmp_path / "chat_template.jinja").write_text("({{ messages[0].content }})")
    assert KimiTokenizer.from_dir(tmp_path).apply_chat_template(hi, tokenize=False) == "(hi)"
    config["chat_template"] = 5
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="chat_template must be a string"):
        KimiTokenizer.from_dir(tmp_path)


def test_trainer_is_deterministic_and_builds_by_merges():
    text = builtin_corpus(seed=3, sentences=800)
    vocab = train_bpe(text, 400)
    assert vocab == train_bpe(text, 400)
    assert len(set(vocab)) == 400 and vocab[:256] == [bytes([i]) for i in range(256)]
    earlier = set(vocab[:256])
    for token in vocab[256:]:  # each token is two earlier tokens joined
        assert any(token[:k] in earlier and token[k:] in earlier for k in range(1, len(token)))
        earlier.add(token)
    with pytest.raises(ValueError, match="corpus too small"):
        train_bpe("ab ab", 300)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_name_marks_make_names_copyable(tmp_path, detach):
    """With detach_name_marks a capitalised name is the same ids after a space, after a
    quote and at the start; without it the trainer learns ' Paris' and '"Paris' as merges."""
    cities = ["Paris", "Oslo", "Lima", "Quito", "Dakar"]
    text = "".join(
        f'Weather in {c}? {{"city": "{c}"}} It is sunny in {c}. ' * 40 for c in cities
    ) + builtin_corpus(seed=1, sentences=300)
    write_vocab_dir(train_bpe(text, 600, detach_name_marks=detach), tmp_path)
    tok = KimiTokenizer.from_dir(tmp_path)
    for city in cities:
        bare = tok.encode(city)
        after_space, after_quote = tok.encode(" " + city), tok.encode('"' + city)
        assert (after_space[1:] == bare and after_quote[1:] == bare) is detach, city
        assert tok.decode(after_quote) == '"' + city


def test_make_small_vocab_reproduces_the_shipped_assets(tmp_path):
    script = REPO / "scripts" / "make_small_vocab.py"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "v")],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert run.returncode == 0, run.stderr
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "v" / name).read_bytes() == (SMALL_VOCAB_DIR / name).read_bytes()


def test_make_small_vocab_domain_corpus_and_bad_input(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(builtin_corpus(seed=5, sentences=500), encoding="utf-8")
    script = str(REPO / "scripts" / "make_small_vocab.py")
    ok = subprocess.run(
        [
            sys.executable,
            script,
            "--corpus",
            str(corpus),
            "--size",
            "300",
            "--out",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert ok.returncode == 0, ok.stderr
    tok = KimiTokenizer.from_dir(tmp_path / "d")
    assert tok.vocab_size == 556 and tok.special_ids["[EOS]"] == 301
    bad = subprocess.run(
        [
            sys.executable,
            script,
            "--corpus",
            str(tmp_path / "nope.txt"),
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "nope.txt: no such file" in bad.stderr and not (tmp_path / "e").exists()
