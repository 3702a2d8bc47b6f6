"""What every backend checks and defaults for a batch of requests, before any work is broadcast.

Shared by the torch executor's engine and the TensorRT-LLM adapters, so a prompt is
refused with the same one-line UserError whichever backend runs it.
"""

from __future__ import annotations

from collections.abc import Iterable

from kimi_trt.errors import UserError
from kimi_trt.runtime.sampling import SamplingParams


def check_prompts(
    prompts: list[list[int]],
    params: list[SamplingParams],
    vocab_size: int,
    max_input_len: int,
    max_seq_len: int,
) -> None:
    """UserError naming the first prompt an engine with these limits cannot run."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) > max_input_len:
            raise UserError(
                f"prompt {i} has {len(p)} tokens; this engine accepts at most {max_input_len}"
            )
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise UserError(
                f"prompt {i}: token id {bad[0]!r} outside the vocabulary 0..{vocab_size - 1}"
            )
        if len(p) >= max_seq_len and sp.max_new_tokens > 0:
            raise UserError(f"prompt {i} leaves no room to generate (max_seq_len {max_seq_len})")


def sampling_params_list(
    prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None
) -> list[SamplingParams]:
    """One SamplingParams per prompt: None -> defaults, one -> shared by all, a list -> as is."""
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise UserError(f"{len(params)} sampling params for {len(prompts)} prompts")
    return list(params)


def unconstrained_batch(
    engine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams] | None,
    constraints: list | None,
    backend: str,
) -> list[SamplingParams]:
    """The start of `generate` on a backend without token constraints (the TensorRT-LLM
    adapters): refuse any constraint, then one SamplingParams per prompt, each prompt
    checked by `engine.validate_prompts`.

    Shared so both adapters refuse a constrained request, and a bad prompt, the same way;
    `backend` ends the message ("constrained decoding is not available on {backend}").
    """
    if constraints and any(c is not None for c in constraints):
        raise UserError(f"constrained decoding is not available on {backend}")
    plist = sampling_params_list(prompts, params)
    engine.validate_prompts(prompts, plist)
    return plist


def default_stop_ids(config_eos: Iterable[int], tokenizer) -> tuple[int, ...]:
    """Default stop ids: config eos, plus the tokenizer's (<|im_end|>) when present."""
    ids = list(config_eos)
    for t in getattr(tokenizer, "eos_token_ids", ()) or ():
        if t not in ids:
            ids.append(t)
    return tuple(ids)
