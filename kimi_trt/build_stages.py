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
from kimi_trt.checksum import ALGORITHM
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
    """The planner `kimi-trt plan` runs (kimi_trt.plan.make_plan): refuses backend/format/GPU
    combinations the backend cannot run and layouts that do not fit, with the same reason."""
    from kimi_trt.plan import make_plan, require_fit
    from kimi_trt.plan_report import plan_to_dict, render_plan

    plan = make_plan(ctx.build, ctx.model)
    for line in render_plan(plan).splitlines():
        ctx.log(f"  {line}")
    if plan.unsupported:
        raise ConfigError(f"{ctx.config_path}: {plan.reason}")
    require_fit(plan)
    require_clean_output(ctx.build)
    path = _write_json(ctx.out / STATE_DIR / "plan.json", plan_to_dict(plan))
    return [path], {"summary": f"{plan.layout} on {plan.device.label}: {plan.reason}"}


# ---- convert ------------------------------------------------------------------------------


def _check_llmapi_checkpoint(ctx: BuildContext) -> StageResult:
    """Backend llmapi: the converter's checks on the HF checkpoint TensorRT-LLM will load,
    and with fp8_ue8m0 weights a UE8M0-requantised copy of it (error logged per class)."""
    from kimi_trt.llmapi.checkpoint import check_checkpoint, requantize_ue8m0

    reader, summary = check_checkpoint(ctx.build.checkpoint, ctx.model)
    files: list[Path] = []
    if _llmapi_requantizes(ctx):
        files, errors = requantize_ue8m0(reader, llmapi_checkpoint(ctx), ctx.log)
        summary["ue8m0_error"] = errors
        for cls, err in errors.items():
            ctx.log(
                f"[convert] {cls}: UE8M0 requantisation error max {err['max_rel_err']:.3g}, "
                f"mean {err['mean_rel_err']:.3g} (relative)"
            )
    report = _write_json(ctx.out / STATE_DIR / "checkpoint-check.json", summary)
    where = llmapi_checkpoint(ctx)
    return files + [report], {
        "summary": f"{summary['tensors']} tensors in {summary['files']} file(s) check out; "
        f"TensorRT-LLM loads {where}"
    }


def _llmapi_requantizes(ctx: BuildContext) -> bool:
    from kimi_trt.config import LINEAR_CLASSES

    return {ctx.build.weights.for_class(c) for c in LINEAR_CLASSES} == {"fp8_ue8m0"}


def llmapi_checkpoint(ctx: BuildContext) -> Path:
    """The HF checkpoint an llmapi engine dir points at: the source, or its UE8M0 copy."""
    from kimi_trt.llmapi.checkpoint import UE8M0_DIR

    return ctx.out / UE8M0_DIR if _llmapi_requantizes(ctx) else ctx.build.checkpoint


def stage_convert(ctx: BuildContext) -> StageResult:
    """HF checkpoint -> per-rank checkpoint in convert_dir (the converter resumes itself);
    backend llmapi: the checks of `_check_llmapi_checkpoint` (nothing to convert)."""
    from kimi_trt.convert.converter import convert_checkpoint

    if ctx.build.backend == "llmapi":
        return _check_llmapi_checkpoint(ctx)

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


def _write_llmapi_dir(ctx: BuildContext) -> StageResult:
    """Backend llmapi: the LLM-API options (checked against the pinned TensorRT-LLM's field
    names) and config.json pointing at the checkpoint, with the limits and the HF config."""
    from kimi_trt.engine_dir import ENGINE_CONFIG, LLMAPI_BACKEND
    from kimi_trt.llmapi.options import OPTIONS_FILE, check_options, llm_api_options, write_options

    build, world = ctx.build, ctx.build.parallelism.world_size
    options = llm_api_options(build)
    check_options(options, str(ctx.config_path))
    ckpt = llmapi_checkpoint(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    header = (
        "TensorRT-LLM TorchLlmArgs options (tensorrt-llm==1.2.1), written by kimi-trt build.\n"
        f"kimi-trt: {'mpirun -np ' + str(world) + ' ' if world > 1 else ''}kimi-trt run "
        f"--engine-dir {ctx.out} --chat Hello\n"
        f"trtllm-serve: trtllm-serve {ckpt} --extra_llm_api_options {ctx.out / OPTIONS_FILE}"
    )
    files = [write_options(ctx.out / OPTIONS_FILE, options, header)]
    config = {
        "backend": LLMAPI_BACKEND,
        "checkpoint": str(ckpt),
        "tensorrt_llm": "1.2.1",
        "world_size": world,
        "mapping": ctx.mapping.to_trtllm_dict(),
        "build_config": build.limits.model_dump(mode="json"),
        "hf_config": ctx.model.to_hf_dict(),
    }
    files.append(_write_json(ctx.out / ENGINE_CONFIG, config))
    return files, {"summary": f"backend llmapi: {OPTIONS_FILE} for {world} rank(s), model {ckpt}"}


def stage_compile(ctx: BuildContext) -> StageResult:
    """Backend trtllm: one engine per rank (GPU + tensorrt_llm); torch: link the checkpoint;
    llmapi: write the LLM-API options."""
    if ctx.build.backend == "torch":
        return _link_checkpoint(ctx)
    if ctx.build.backend == "llmapi":
        return _write_llmapi_dir(ctx)
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
    """Copy the tokenizer files and write manifest.json (checksum of every engine-dir file)."""
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
        "format_version": 2,
        "checksum_algorithm": ALGORITHM,
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
        "checkpoint": str(llmapi_checkpoint(ctx) if build.backend == "llmapi" else ctx.convert_dir),
        "tokenizer_files": sorted(p.name for p in copied),
        "files": ctx.sums.record(ctx.out, _engine_files(ctx)),
    }
    path = _write_json(ctx.out / ENGINE_MANIFEST, manifest)
    return copied + [path], {
        "summary": f"{len(copied)} tokenizer file(s), manifest of {len(manifest['files'])} files"
    }


def finish_llmapi(ctx: BuildContext) -> None:
    """After a complete backend-llmapi build: TensorRT-LLM's own TorchLlmArgs check of the
    options where it is installed (GPU host); elsewhere exit 3 with what to run there."""
    from kimi_trt.runtime.llmapi_backend import (
        PINNED,
        check_with_tensorrt_llm,
        finish_command,
        read_llmapi_dir,
        tensorrt_llm_problem,
    )

    problem = tensorrt_llm_problem()
    if problem:
        d = read_llmapi_dir(ctx.out)
        raise MissingCapability(
            f"engine dir {ctx.out} is complete (LLM-API options checked against {PINNED}'s "
            f"field names), but TensorRT-LLM cannot run here: {problem}. On a GPU host with "
            f"{PINNED}: {finish_command(d)} (or kimi-trt verify / kimi-trt serve on it)"
        )
    check_with_tensorrt_llm(ctx.out)
    ctx.log(f"[finish] TensorRT-LLM's TorchLlmArgs accepts {ctx.out}")


STAGE_FUNCTIONS = {
    "plan": stage_plan,
    "convert": stage_convert,
    "compile": stage_compile,
    "package": stage_package,
}
