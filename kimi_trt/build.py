"""`kimi-trt build`: plan -> convert -> compile -> package, each stage resumable.

The stages of docs/design.md's data flow, run in order by one function (`run_build`):

    plan     ModelConfig + BuildConfig -> memory plan; refuses layouts that do not fit and
             backend/format/GPU combinations the executors cannot run, before any weight
             is read (exit 2 with the planner's numbers).
    convert  HF checkpoint -> per-rank checkpoint (kimi_trt.convert, itself resumable).
    compile  backend trtllm: one TensorRT-LLM engine per rank (kimi_trt.trtllm, GPU host
             only; elsewhere exit 3 naming what is missing and the command to finish);
             backend torch: the per-rank checkpoint is linked into the engine dir as is.
    package  tokenizer files copied, `manifest.json` (checksum of every file) written.

Resumability (the state file and stage keys: `kimi_trt.build_context`): a rerun skips a
stage when its key is unchanged and every recorded output still has its checksum, and
redoes the stages a config change affects. Each stage logs what it did and its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kimi_trt.build_context import (
    INPUTS_CHANGED,
    STAGES,
    BuildContext,
    Log,
    StageReport,
    load_context,
)
from kimi_trt.build_stages import STAGE_FUNCTIONS, finish_llmapi
from kimi_trt.errors import ConfigError, UserError


def _verified(ctx: BuildContext, stage: str) -> str | None:
    """Why `stage` must run (None: its recorded outputs verify and its key is unchanged)."""
    entry = ctx.state.stages.get(stage)
    if entry is None:
        return "not done yet"
    if entry.get("key") != ctx.keys[stage]:
        return INPUTS_CHANGED
    return ctx.sums.mismatch(ctx.out, entry.get("files", {}))


def _remove_recorded(ctx: BuildContext, stage: str) -> None:
    """Delete the files a previous run of `stage` produced (its inputs changed)."""
    entry = ctx.state.forget(stage)
    for rel in (entry or {}).get("files", {}):
        (ctx.out / rel).unlink(missing_ok=True)


def run_stage(ctx: BuildContext, stage: str, fn: Callable[[BuildContext], tuple[list[Path], dict]]):
    """Skip `stage` if it verifies, else run `fn` and record its outputs; log either way."""
    t0 = time.perf_counter()
    why = _verified(ctx, stage)
    if why is None:
        info = ctx.state.stages[stage].get("info", {})
        report = StageReport(stage, "skipped", time.perf_counter() - t0, info.get("summary", ""))
        ctx.log(f"[{stage}] skipped: outputs verify ({report.seconds:.2f}s)")
    else:
        ctx.log(f"[{stage}] running ({why})")
        if why == INPUTS_CHANGED:
            _remove_recorded(ctx, stage)
        else:
            ctx.state.forget(stage)
        outputs, info = fn(ctx)
        ctx.state.complete(stage, ctx.keys[stage], ctx.sums.record(ctx.out, outputs), info)
        report = StageReport(stage, "ran", time.perf_counter() - t0, info.get("summary", ""))
        ctx.log(f"[{stage}] done in {report.seconds:.2f}s: {report.detail}")
    ctx.reports.append(report)
    return report


@dataclass
class BuildResult:
    output_dir: Path
    reports: list[StageReport]

    @property
    def ran(self) -> list[str]:
        return [r.stage for r in self.reports if r.action == "ran"]

    def summary(self) -> str:
        total = sum(r.seconds for r in self.reports)
        did = ", ".join(self.ran) if self.ran else "nothing to redo, every stage verified"
        return f"build: {did} ({total:.1f}s); engine dir {self.output_dir}"


def run_build(
    config_path: Path,
    stop_after: str | None = None,
    log: Log = print,
    overrides: dict[str, Path | None] | None = None,
) -> BuildResult:
    """Run the stages up to `stop_after` (default: all), skipping those that verify.

    A complete backend-llmapi build ends with `finish_llmapi`: TensorRT-LLM's own check of
    the options where tensorrt_llm is installed, else exit 3 naming the command to run on a
    GPU host (the engine dir is complete either way)."""
    if stop_after is not None and stop_after not in STAGES:
        raise UserError(f"--stop-after {stop_after!r}: expected one of {', '.join(STAGES)}")
    ctx = load_context(Path(config_path), log, overrides)
    stages = STAGES[: STAGES.index(stop_after) + 1] if stop_after else STAGES
    mpi_rank, mpi_size = _mpi_place()
    if mpi_size > 1:
        return _run_build_mpi(ctx, stages, mpi_rank)
    for stage in stages:
        run_stage(ctx, stage, STAGE_FUNCTIONS[stage])
    if ctx.build.backend == "llmapi" and stop_after in (None, "package"):
        finish_llmapi(ctx)
    return BuildResult(ctx.out, ctx.reports)


def _mpi_place() -> tuple[int, int]:
    """(rank, size) when started by an MPI launcher, else (0, 1)."""
    from kimi_trt.runtime.launch import detect_rank_info

    info = detect_rank_info()
    return info.rank, info.world_size


def _run_build_mpi(ctx: BuildContext, stages: tuple[str, ...], mpi_rank: int) -> BuildResult:
    """Under mpirun: every process compiles its share of the engines; nothing else runs twice.

    Plan and convert must already be done (they are single-process work): a one-process
    `kimi-trt build --stop-after convert` first. Each process verifies that (read-only),
    builds the engines r with r % size == its rank (kimi_trt.trtllm.compile), then MPI
    rank 0 alone records the stage and packages. A failing process makes mpirun stop the job.
    """
    for stage in ("plan", "convert"):
        why = _verified(ctx, stage)
        if why is not None:
            raise ConfigError(
                f"under mpirun, kimi-trt build only compiles; its {stage} stage is not done ({why}): "
                f"run `kimi-trt build --config {ctx.config_path} --stop-after convert` as one "
                "process first"
            )
        ctx.reports.append(StageReport(stage, "skipped", 0.0, "verified"))
    if "compile" in stages:
        if mpi_rank == 0 or ctx.build.backend == "trtllm":
            t0 = time.perf_counter()
            outputs, info = STAGE_FUNCTIONS["compile"](ctx)
            ctx.reports.append(
                StageReport("compile", "ran", time.perf_counter() - t0, info["summary"])
            )
            if mpi_rank == 0:
                ctx.state.complete(
                    "compile", ctx.keys["compile"], ctx.sums.record(ctx.out, outputs), info
                )
        if mpi_rank == 0 and "package" in stages:
            run_stage(ctx, "package", STAGE_FUNCTIONS["package"])
    return BuildResult(ctx.out, ctx.reports)
