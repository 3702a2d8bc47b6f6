"""`kimi-trt run`: one process per rank; rank 0 reads the prompts, generates and prints.

Prompts come from exactly one of --prompt (raw text), --chat (one user turn through the
chat template), --prompt-ids (comma-separated ids) or --input-file (JSON lines, each
object holding one of "prompt", "chat", "messages" or "prompt_ids"). Text needs a
tokenizer: the engine dir's (or --tokenizer-dir). Output: streamed text for a single
prompt, or with --json one object per prompt on stdout:
{"prompt_tokens": [...], "tokens": [...], "text": "..." | null, "finish_reason": "..."}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_trt.errors import UserError
from kimi_trt.runtime.failure import run_this_rank, shared
from kimi_trt.runtime.generate import GenerationResult
from kimi_trt.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts come from (exactly one field set; checked by `check`)."""

    prompt: str | None = None
    chat: str | None = None
    prompt_ids: str | None = None
    input_file: Path | None = None

    def check(self) -> None:
        given = [n for n in ("prompt", "chat", "prompt_ids", "input_file") if getattr(self, n)]
        if len(given) != 1:
            opts = ", ".join("--" + n.replace("_", "-") for n in given) or "none"
            raise UserError(
                f"give exactly one of --prompt, --chat, --prompt-ids, --input-file (got {opts})"
            )
        if self.prompt_ids is not None:
            parse_ids(self.prompt_ids, "--prompt-ids")


def parse_ids(text: str, where: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(
            f"{where}: expected comma-separated token ids like 1,2,3, got {text!r}"
        ) from None
    if not ids:
        raise UserError(f"{where}: no token ids given")
    return ids


def _need_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise UserError(
            f"{what} needs a tokenizer, but the engine dir has no tiktoken.model; "
            "pass --tokenizer-dir or use --prompt-ids"
        )
    return tokenizer


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict)
        and part.get("type", "text") == "text"
        and isinstance(part.get("text"), str)
    )


def _is_tool_call(call: Any) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return (
        isinstance(fn, dict)
        and isinstance(fn.get("name"), str)
        and isinstance(fn.get("arguments", ""), (str, dict))
        and isinstance(call.get("id", ""), str)
    )


def _check_message(m: Any, where: str) -> None:
    """One chat message as the template expects it: string role, content a string, null
    or a list of text parts, string name/tool_call_id, tool_calls with named functions."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise UserError(f"{where}: expected an object with a string 'role'")
    content = m.get("content")
    if not (
        content is None
        or isinstance(content, str)
        or (isinstance(content, list) and all(map(_is_text_part, content)))
    ):
        raise UserError(
            f"{where}: 'content' must be a string, null or a list of "
            f'{{"type": "text", "text": "..."}} parts, got {json.dumps(content)[:60]}'
        )
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {json.dumps(m[key])[:60]}")
    calls = m.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(map(_is_tool_call, calls))):
        raise UserError(
            f"{where}: 'tool_calls' must be a list of "
            f'{{"function": {{"name": "...", "arguments": ...}}}} objects'
        )


def _messages(obj: dict, where: str) -> list[dict]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of message objects")
    for i, m in enumerate(messages):
        _check_message(m, f"{where}: messages[{i}]")
    return messages


def _text(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj[key], str):
        raise UserError(f"{where}: {key!r} must be a string, got {json.dumps(obj[key])[:60]}")
    return obj[key]


def _line_prompt(obj: Any, tokenizer, where: str) -> list[int]:
    """The token ids of one --input-file line; every field's type checked first."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise UserError(f"{where}: 'prompt_ids' must be a list of integers")
        return ids
    if "prompt" in obj:
        return _need_tokenizer(tokenizer, where).encode(_text(obj, "prompt", where))
    if "chat" in obj:
        messages = [{"role": "user", "content": _text(obj, "chat", where)}]
        return _need_tokenizer(tokenizer, where).apply_chat_template(messages)
    if "messages" in obj:
        return _need_tokenizer(tokenizer, where).apply_chat_template(_messages(obj, where))
    raise UserError(f"{where}: needs one of 'prompt', 'chat', 'messages', 'prompt_ids'")


def _read_text(path: Path) -> str:
    """The input file as UTF-8 text; unreadable or not UTF-8 is one line naming the spot."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read input file ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None


def read_input_file(path: Path, tokenizer) -> list[list[int]]:
    text = _read_text(path)
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{n}: malformed JSON (nested too deeply)") from None
        prompts.append(_line_prompt(obj, tokenizer, f"{path}:{n}"))
    if not prompts:
        raise UserError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def collect_prompts(src: PromptSource, tokenizer) -> list[list[int]]:
    """The token ids of every prompt (rank 0 only: only it needs the input)."""
    if src.prompt_ids is not None:
        return [parse_ids(src.prompt_ids, "--prompt-ids")]
    if src.prompt is not None:
        return [_need_tokenizer(tokenizer, "--prompt").encode(src.prompt)]
    if src.chat is not None:
        messages = [{"role": "user", "content": src.chat}]
        return [_need_tokenizer(tokenizer, "--chat").apply_chat_template(messages)]
    return read_input_file(src.input_file, tokenizer)


def result_json(result: GenerationResult, tokenizer, keep_special: bool = False) -> dict[str, Any]:
    """The --json line; special tokens are left out of `text` (as peers do) unless kept."""
    skip = not keep_special
    text = tokenizer.decode(result.tokens, skip_special=skip) if tokenizer is not None else None
    return {
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.tokens,
        "text": text,
        "finish_reason": result.finish_reason,
    }


class _Streamer:
    """Prints a single prompt's continuation as it is produced (text, or ids without a tokenizer)."""

    def __init__(self, tokenizer, keep_special: bool = False):
        skip = not keep_special
        self.detok = tokenizer.detokenizer(skip_special=skip) if tokenizer is not None else None

    def __call__(self, index: int, token: int) -> None:
        piece = self.detok.feed(token) if self.detok else f"{token} "
        sys.stdout.write(piece)
        sys.stdout.flush()

    def close(self, result: GenerationResult) -> None:
        tail = self.detok.flush() if self.detok else ""
        sys.stdout.write(f"{tail}\n")
        sys.stderr.write(f"[{len(result.tokens)} tokens, finish_reason={result.finish_reason}]\n")


def _drive(
    engine, src: PromptSource, params: SamplingParams, as_json: bool, keep_special: bool
) -> None:
    try:
        prompts = collect_prompts(src, engine.tokenizer)
        engine.validate_prompts(prompts, [params] * len(prompts))
    except UserError as e:  # about the job's input, not a rank: one line, no rank prefix
        raise shared(e) from None
    stream = not as_json and len(prompts) == 1
    streamer = _Streamer(engine.tokenizer, keep_special) if stream else None
    results = engine.generate(prompts, params, on_token=streamer)
    for i, res in enumerate(results):
        if as_json:
            print(json.dumps(result_json(res, engine.tokenizer, keep_special)), flush=True)
        elif streamer is not None:
            streamer.close(res)
        else:
            out = result_json(res, engine.tokenizer, keep_special)
            body = out["text"] if out["text"] is not None else " ".join(map(str, res.tokens))
            print(f"--- prompt {i} ({res.finish_reason}) ---\n{body}", flush=True)
    failed = [res.error for res in results if res.error is not None]
    if failed:  # printed with finish_reason "error" above; the run still failed
        raise failed[0]


def run_command(
    engine_dir: Path,
    src: PromptSource,
    params: SamplingParams,
    as_json: bool,
    tokenizer_dir: Path | None = None,
    keep_special_tokens: bool = False,
) -> int:
    """The body of `kimi-trt run` on every rank; returns the exit code."""
    from kimi_trt.runtime.engine import load_engine

    src.check()

    def body() -> int:
        engine = load_engine(engine_dir, tokenizer_dir=tokenizer_dir)
        if not engine.is_driver:
            engine.worker_loop()
            return 0
        # On failure rank 0 just exits: the workers' pending broadcast then fails and they
        # stop too. shutdown() is only for the success path (it would wait on a hung peer).
        _drive(engine, src, params, as_json, keep_special_tokens)
        engine.shutdown()
        return 0

    return run_this_rank(body)
