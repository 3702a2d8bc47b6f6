"""The four stages of `kimi-trt build` (orchestrated and made resumable by kimi_trt.build).

Each stage function takes the BuildContext and returns (files it produced, info) where
info["summary"] is the one-line account the build log prints. The heavy work lives in
the stage's own module (planner, converter, TensorRT-LLM compile); these functions only
connect them to the build's directories and turn their outcome into log lines.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from kimi_trt.build_context import (
    ENGINE_MANIFEST,
    STATE_DIR,
    TOKENIZER_FILES,
    BuildContext,
    copy_file,
    require_clean_output,
    tool_version,
)
from kimi_trt.engine_dir import ENGINE_FORMAT
from kimi_trt.errors import ConfigError, MissingCapability

StageResult = tuple[list[Path], dict[str, Any]]


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


# ---- plan ---------------------------------------------------------------------------------


def stage_plan(ctx: BuildContext) -> StageResult:
    """Refuse unsupported format/GPU/backend combinations and layouts that do not fit."""
    from kimi_trt.plan import make_plan, plan_to_dict, render_plan, require_fit
    from kimi_trt.trtllm.support import support_notes, support_problems

    build = ctx.build
    problems = support_problems(build)
    if problems:
        raise ConfigError(f"{ctx.config_path}: " + "; ".join(problems))
    plan = make_plan(build, ctx.model)
    for line in render_plan(plan).splitlines():
        ctx.log(f"  {line}")
    require_fit(plan)
    require_clean_output(build)
    for note in support_notes(build, ctx.model):
        ctx.log(f"[plan] note: {note}")
    path = _write_json(ctx.out / STATE_DIR / "plan.json", plan_to_dict(plan))
    return [path], {"summary": f"{plan.layout} on {plan.device.label}: {plan.reason}"}


# ---- convert ------------------------------------------------------------------------------


def stage_convert(ctx: BuildContext) -> StageResult:
    """HF checkpoint -> per-rank checkpoint in convert_dir (the converter resumes itself)."""
    from kimi_trt.convert.converter import convert_checkpoint

    build, out = ctx.build, ctx.convert_dir
    manifest = convert_checkpoint(
        build.checkpoint,
        out,
        parallelism=build.parallelism,
        formats=build.weights,
        progress=True,
        warn=ctx.log,
    )
    files = [out / name for name in manifest["files"]] + [out / "manifest.json"]
    for cls, err in sorted(manifest.get("requant_error", {}).items()):
        if not err.get("exact", True):
            ctx.log(
                f"[convert] {cls}: {err['format']} requantisation error "
                f"max {err['max_rel_err']:.3g}, mean {err['mean_rel_err']:.3g} (relative)"
            )
    world = manifest["world_size"]
    total = sum(f["bytes"] for f in manifest["files"].values())
    return files, {"summary": f"{world} rank file(s), {total / 1e6:,.1f} MB in {out}"}


# ---- compile ------------------------------------------------------------------------------


def finish_command(ctx: BuildContext) -> str:
    """The command that completes this build on a GPU host with tensorrt_llm."""
    return f"kimi-trt build --config {shlex.quote(str(ctx.config_path.resolve()))}"


def _link_checkpoint(ctx: BuildContext) -> StageResult:
    """Backend torch: the engine dir is the per-rank checkpoint (rank files hard-linked).

    config.json is the checkpoint's plus a `build_config` object with the limits, where
    TensorRT-LLM's engine config.json keeps them, so the runtime reads both alike.
    """
    from kimi_trt.convert.rank_checkpoint import CONFIG_NAME, read_rank_config

    cfg = read_rank_config(ctx.convert_dir)
    raw = json.loads((ctx.convert_dir / CONFIG_NAME).read_text())
    raw["build_config"] = {
        **ctx.build.limits.model_dump(mode="json"),
        "kv_cache_dtype": ctx.build.kv_cache_dtype,
        "kv_cache_free_gpu_mem_fraction": ctx.build.kv_cache_free_gpu_mem_fraction,
    }
    files = [_write_json(ctx.out / CONFIG_NAME, raw)]
    for r in range(cfg.world_size):
        name = cfg.rank_file(r).name
        files.append(copy_file(ctx.convert_dir / name, ctx.out / name, link=True))
    return files, {"summary": f"torch backend: {cfg.world_size} rank file(s) linked into {ctx.out}"}


def stage_compile(ctx: BuildContext) -> StageResult:
    """Backend trtllm: one engine per rank (GPU + tensorrt_llm); torch: link the checkpoint."""
    if ctx.build.backend == "torch":
        return _link_checkpoint(ctx)
    from kimi_trt.trtllm.compile import compile_engines, missing_capability

    missing = missing_capability()
    if missing:
        raise MissingCapability(
            f"cannot compile TensorRT-LLM engines on this host: {missing}. The converted "
            f"per-rank checkpoint is complete in {ctx.convert_dir}; on a GPU host with "
            f"tensorrt_llm installed (pip install 'kimi_trt[trtllm]') run: {finish_command(ctx)}"
        )
    files = compile_engines(ctx.convert_dir, ctx.out, ctx.build, log=ctx.log)
    engines = [f for f in files if f.suffix == ".engine"]
    size = sum(f.stat().st_size for f in engines)
    return files, {"summary": f"{len(engines)} engine(s), {size / 1e6:,.1f} MB in {ctx.out}"}


# ---- package ------------------------------------------------------------------------------


def _engine_files(ctx: BuildContext) -> list[Path]:
    """Every file of the engine dir that the manifest covers (not the state or checkpoint)."""
    skip = {ENGINE_MANIFEST}
    return sorted(
        p
        for p in ctx.out.iterdir()
        if p.is_file() and p.name not in skip and not p.name.endswith(".tmp")
    )


def stage_package(ctx: BuildContext) -> StageResult:
    """Copy the tokenizer files and write manifest.json (sha256 of every engine-dir file)."""
    tdir = ctx.build.resolved_tokenizer_dir
    copied = [
        copy_file(tdir / n, ctx.out / n, link=False)
        for n in TOKENIZER_FILES
        if (tdir / n).is_file()
    ]
    if not copied:
        ctx.log(
            f"[package] warning: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) in {tdir}; "
            "the engine dir accepts token ids only"
        )
    build = ctx.build
    manifest = {
        "kind": ENGINE_FORMAT,
        "format_version": 1,
        "tool": "kimi_trt",
        "tool_version": tool_version(),
        "backend": build.backend,
        "gpu": build.gpu,
        "world_size": build.parallelism.world_size,
        "mapping": ctx.mapping.to_trtllm_dict(),
        "weight_formats": build.weights.model_dump(mode="json"),
        "limits": build.limits.model_dump(mode="json"),
        "kv_cache_dtype": build.kv_cache_dtype,
        "kv_cache_free_gpu_mem_fraction": build.kv_cache_free_gpu_mem_fraction,
        "build_config_hash": build.config_hash(),
        "model_config_hash": ctx.model.config_hash(),
        "checkpoint": str(ctx.convert_dir),
        "tokenizer_files": sorted(p.name for p in copied),
        "files": ctx.sums.record(ctx.out, _engine_files(ctx)),
    }
    path = _write_json(ctx.out / ENGINE_MANIFEST, manifest)
    return copied + [path], {
        "summary": f"{len(copied)} tokenizer file(s), manifest of {len(manifest['files'])} files"
    }


STAGE_FUNCTIONS = {
    "plan": stage_plan,
    "convert": stage_convert,
    "compile": stage_compile,
    "package": stage_package,
}
