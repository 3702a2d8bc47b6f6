"""`kimi-trt verify --engine-dir DIR`: prove an engine dir computes what transformers computes.

Fixed prompts run on whichever backend the dir uses (torch executor on CPU or GPU,
TensorRT-LLM's PyTorch backend, TensorRT-LLM engines - through `load_engine`, under
mpirun for multi-rank dirs) and are compared with references computed by transformers'
DeepseekV3 for the shipped tiny model and shipped with the package (assets/verify/, made by
kimi_trt.testing.verify_reference): greedy tokens, and the logits row behind every
generated token (one prefill of prompt + reference tokens: `engine.score`). Before anything
is loaded, every file of the engine manifest is re-hashed, so a changed rank file is named
even when it still loads. The result is a pass/fail table; exit 1 when any check fails.

Tolerances follow the engine's precision: fp32 (the torch executor on CPU) must match to
1e-3 of the logit scale with every token equal; bf16 (GPUs) to 5e-2, and its tokens must
match up to the first step where the reference's top-1/top-2 margin is under 0.5 logits (a
near-tie bf16 may legitimately break the other way; later steps are then unchecked).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kimi_trt.checksum import file_matches, manifest_algorithm
from kimi_trt.config import ModelConfig, model_config_from_dict
from kimi_trt.convert.manifest import manifest_files
from kimi_trt.convert.safetensors_header import read_safetensors_header
from kimi_trt.engine_dir import ENGINE_CONFIG, ENGINE_FORMAT, MANIFEST, is_llmapi_dir
from kimi_trt.errors import CheckpointError, ConfigError, UserError
from kimi_trt.json_files import read_json

REFERENCES = Path(__file__).resolve().parent / "assets" / "verify" / "tiny-kimi"
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
NEAR_TIE = 0.5  # logits: bf16 may flip a reference choice whose margin is below this


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor  # [steps, vocab] fp32
    margins: list[float]


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


# The provenance keys verify reads from `<references>.json`, and their types.
META_KEYS = {"model": str, "model_config_hash": str, "reference": str, "steps": int, "prompts": int}
# Per case i, the tensors `<references>.safetensors` holds: dtypes allowed and rank.
CASE_TENSORS = {
    "prompt": (("I64", "I32"), 1),
    "tokens": (("I64", "I32"), 1),
    "logits": (("F32",), 2),
    "margins": (("F32",), 1),
}


def _reference_meta(path: Path) -> dict[str, Any]:
    """`<references>.json`, each key verify uses present with its type (one-line ConfigError
    otherwise: a damaged install must not become a KeyError halfway through the table)."""
    meta = read_json(path, ConfigError)
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object of reference provenance")
    for key, kind in META_KEYS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "a string" if kind is str else "an integer"
            raise ConfigError(f"{path}: '{key}' must be {what}, got {value!r:.60}")
    if meta["prompts"] < 1 or meta["steps"] < 1:
        raise ConfigError(f"{path}: 'prompts' and 'steps' must be at least 1")
    return meta


def _check_reference_tensors(path: Path, prompts: int) -> None:
    """The header is valid (`safetensors_header`) and holds, per case, the four tensors with
    the dtype and rank `Case` needs, logits one row per reference token."""
    tensors = read_safetensors_header(path).tensors
    for i in range(prompts):
        for field, (dtypes, rank) in CASE_TENSORS.items():
            name = f"{i}.{field}"
            entry = tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{path}: tensor '{name}' is missing ({prompts} prompts)")
            if entry.dtype not in dtypes or len(entry.shape) != rank:
                raise CheckpointError(
                    f"{path}: tensor '{name}' is {entry.dtype} {list(entry.shape)}, expected "
                    f"{' or '.join(dtypes)} of rank {rank}"
                )
        steps = tensors[f"{i}.tokens"].shape[0]
        for field in ("logits", "margins"):
            got = tensors[f"{i}.{field}"].shape[0]
            if got != steps:
                raise CheckpointError(
                    f"{path}: tensor '{i}.{field}' has {got} rows, '{i}.tokens' {steps} tokens"
                )


def load_references(base: Path = REFERENCES) -> tuple[list[Case], dict[str, Any]]:
    """The shipped cases and their provenance (`<base>.safetensors`, `<base>.json`), both
    checked before use: a broken file is one line naming it and the key or tensor."""
    meta = _reference_meta(base.with_suffix(".json"))
    path = base.with_suffix(".safetensors")
    _check_reference_tensors(path, meta["prompts"])
    t = load_file(str(path))
    cases = [
        Case(
            t[f"{i}.prompt"].tolist(),
            t[f"{i}.tokens"].tolist(),
            t[f"{i}.logits"],
            t[f"{i}.margins"].tolist(),
        )
        for i in range(meta["prompts"])
    ]
    return cases, meta


def _key_path(raw: Any, keys: tuple[str, ...]) -> Any:
    """raw[k0][k1]... or None where a level is missing or not an object."""
    for key in keys:
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw


def engine_model(engine_dir: Path) -> ModelConfig:
    """The model an engine dir was built from, read without loading weights. config.json is
    read with `json_files` (malformed, not UTF-8, nested too deep: one line) and the HF
    config's key path is named when it is missing or not an object."""
    from kimi_trt.convert.rank_checkpoint import read_rank_config
    from kimi_trt.runtime.engine import find_checkpoint_dir

    path = engine_dir / ENGINE_CONFIG
    if is_llmapi_dir(engine_dir):
        keys: tuple[str, ...] = ("hf_config",)
    else:
        ckpt = find_checkpoint_dir(engine_dir)
        if ckpt is not None:
            return read_rank_config(ckpt).model
        if not path.exists():
            raise ConfigError(f"{engine_dir}: not an engine dir kimi-trt can run (no {path.name})")
        keys = ("pretrained_config", "kimi_trt", "hf_config")
    raw = read_json(path, ConfigError)
    where = ".".join(keys)
    hf = _key_path(raw, keys)
    if hf is None:
        raise ConfigError(
            f"{path}: no '{where}' (not an engine dir kimi-trt can run: expected the HF config "
            "it was built from)"
        )
    return model_config_from_dict(hf, src=f"{path}: {where}")


def check_model(engine_dir: Path, meta: dict[str, Any]) -> None:
    """UserError unless the dir was built from the model the references are for."""
    got = engine_model(engine_dir).config_hash()
    if got != meta["model_config_hash"]:
        raise UserError(
            f"{engine_dir}: built from a model with config hash {got}; verify's references are "
            f"for the shipped {meta['model']} ({meta['model_config_hash']}): build "
            "build_configs/tiny_*.yaml with the backend and layout to prove, then verify that"
        )


def read_verify_manifest(engine_dir: Path) -> dict[str, Any] | None:
    """The engine manifest verify re-hashes against, its `files` checked (`manifest_files`:
    each entry a name inside the dir with bytes and a digest); None when the dir has no
    manifest.json or another kind's (a per-rank checkpoint's, which loading checks). A
    manifest.json that is there but broken is a one-line error, not a silent SKIP."""
    path = engine_dir / MANIFEST
    if not path.exists():
        return None
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (expected the engine manifest)")
    manifest = read_json(path, CheckpointError)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object (the engine manifest)")
    if manifest.get("kind") != ENGINE_FORMAT:
        return None
    manifest_files(path, manifest)
    return manifest


def check_files(engine_dir: Path, manifest: dict[str, Any] | None) -> list[Check]:
    """Every file the engine manifest records, re-hashed with the manifest's algorithm."""
    if manifest is None:
        return [Check("files", "SKIP", "no engine manifest (not made by kimi-trt build)")]
    algorithm, bad = manifest_algorithm(manifest), []
    for rel, want in sorted(manifest["files"].items()):
        p = engine_dir / rel
        if not p.is_file():
            bad.append(Check(f"file {rel}", "FAIL", "missing"))
        elif not file_matches(p, want, algorithm):
            bad.append(Check(f"file {rel}", "FAIL", f"{algorithm} differs from manifest.json"))
    n = len(manifest["files"])
    return bad or [Check("files", "PASS", f"{n} files match manifest.json ({algorithm})")]


def compare_tokens(got: list[int], case: Case, precision: str) -> Check:
    want = case.tokens
    for k, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            if precision != "fp32" and case.margins[k] < NEAR_TIE:
                return Check(
                    "tokens",
                    "PASS",
                    f"{k}/{len(want)} equal, then a near-tie (margin "
                    f"{case.margins[k]:.2f}) broken the other way; rest unchecked",
                )
            return Check("tokens", "FAIL", f"differ at step {k}: got {a}, reference {b}")
    if len(got) != len(want):
        return Check("tokens", "FAIL", f"{len(got)} tokens generated, reference {len(want)}")
    return Check("tokens", "PASS", f"{len(want)}/{len(want)} greedy tokens equal")


def compare_logits(rows: torch.Tensor, case: Case, precision: str) -> Check:
    want = case.logits
    if rows.shape != want.shape:
        return Check("logits", "FAIL", f"shape {list(rows.shape)}, reference {list(want.shape)}")
    err = float((rows.float() - want).abs().max() / want.abs().max())
    tol = TOLERANCE[precision]
    worst = int((rows.float() - want).abs().amax(-1).argmax())
    status = "PASS" if err <= tol else "FAIL"
    return Check("logits", status, f"max rel err {err:.2e} (tol {tol:g}; worst at step {worst})")


def prompt_checks(engine, cases: list[Case]) -> list[Check]:
    """Greedy generation and one scoring prefill per case, compared with the references."""
    from kimi_trt.runtime.sampling import SamplingParams

    precision = getattr(engine, "precision", "bf16")
    steps = max(len(c.tokens) for c in cases)
    params = SamplingParams(max_new_tokens=steps, stop_token_ids=())
    generated = engine.generate([c.prompt for c in cases], params)
    scored = engine.score([c.prompt + c.tokens[:-1] for c in cases])
    out = []
    for i, (case, gen, logits) in enumerate(zip(cases, generated, scored, strict=True)):
        start = len(case.prompt) - 1
        for check in (
            compare_tokens(gen.tokens, case, precision),
            compare_logits(logits[start : start + len(case.tokens)], case, precision),
        ):
            out.append(Check(f"prompt {i} {check.name}", check.status, check.detail))
    return out


def render_rows(checks: list[Check]) -> str:
    return "\n".join(f"{c.name:<24} {c.status:<5} {c.detail}" for c in checks)


def verify_command(engine_dir: Path, references: Path = REFERENCES) -> int:
    """The body of `kimi-trt verify` on every rank; rank 0 prints the table and decides."""
    from kimi_trt.runtime.engine import load_engine
    from kimi_trt.runtime.failure import run_this_rank, shared
    from kimi_trt.runtime.launch import detect_rank_info

    cases, meta = load_references(references)

    def body() -> int:
        try:
            check_model(engine_dir, meta)
            manifest = read_verify_manifest(engine_dir)
        except UserError as e:
            raise shared(e) from None
        lead = detect_rank_info().rank == 0
        checks = check_files(engine_dir, manifest) if lead else []
        if lead:
            print(f"verify {engine_dir} against {meta['reference']} ({meta['model']})")
            print(f"{'check':<24} {'':<5} detail\n{render_rows(checks)}", flush=True)
        t0 = time.perf_counter()
        # With an engine manifest, check_files (rank 0) has just re-hashed every file and
        # names a changed one; the engine still loads it, to show what it computes.
        engine = load_engine(engine_dir, verify_checksums=manifest is None)
        if not engine.is_driver:
            engine.worker_loop()
            return 0
        rows = prompt_checks(engine, cases)
        engine.shutdown()
        print(render_rows(rows), flush=True)
        checks += rows
        failed = [c for c in checks if c.status == "FAIL"]
        verdict = "FAIL" if failed else "PASS"
        print(
            f"{verdict}: {len(checks) - len(failed)}/{len(checks)} checks passed "
            f"(backend {engine.backend}, {engine.world_size} rank(s), "
            f"{getattr(engine, 'precision', 'bf16')}, {time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        if failed:
            sys.stderr.write(f"error: verify failed: {', '.join(c.name for c in failed)}\n")
        return 1 if failed else 0

    return run_this_rank(body)
