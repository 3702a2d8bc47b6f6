"""`kimi-trt` command line. Each command parses options and calls one stage's function.

Exit codes (docs/design.md): 0 ok, 2 user error (one line on stderr), 3 missing capability,
1 internal error. User mistakes never print a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from kimi_trt.errors import MissingCapability, UserError
from kimi_trt.runtime.scheduling import DEFAULT_PREFILL_CHUNK


class KimiGroup(click.Group):
    """Turns our error types into one line on stderr and the documented exit code.

    An OSError that reaches here is about the user's files or machine (a parent that is a
    file, a read-only or full disk, /proc): one line naming the path, exit 2. Commands
    check their output paths up front (`output_dirs`); this is the backstop.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, MissingCapability) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:  # a bad option value: one line too, not click's three
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(UserError.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


# Options several commands share (each use of a click.option decorator makes a new Option).
PATH_TYPE = click.Path(path_type=Path)
PORT_TYPE = click.IntRange(1, 65535)
BUILD_CONFIG_OPTION = click.option(
    "--config", "config_path", type=PATH_TYPE, required=True, help="Build YAML."
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def SCHEDULING_OPTIONS(command: Callable) -> Callable:  # noqa: N802 - used as a decorator
    """serve's and triton-repo's batching options (the torch executor's generation loop)."""
    options = [
        click.option(
            "--batching",
            type=click.Choice(["continuous", "static"]),
            default="continuous",
            show_default=True,
            help="torch executor: requests join the running batch at the next step "
            "(continuous) or wait for it to end (static).",
        ),
        click.option(
            "--prefill-chunk",
            type=click.IntRange(min=1),
            default=DEFAULT_PREFILL_CHUNK,
            show_default=True,
            help="torch executor: prompt tokens per step (longer prompts are chunked).",
        ),
        click.option(
            "--prefix-cache/--no-prefix-cache",
            default=True,
            show_default=True,
            help="torch executor: reuse the KV cache of a prompt prefix seen before.",
        ),
        click.option(
            "--batch-window-ms",
            type=click.FloatRange(min=0),
            default=5.0,
            show_default=True,
            help="Static batching: how long to collect requests into one batch.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def engine_dir_option(help: str | None = None) -> Callable[[Callable], Callable]:
    """`--engine-dir DIR` (required), for the commands that read an engine dir."""
    return click.option("--engine-dir", type=PATH_TYPE, required=True, help=help)


@click.group(cls=KimiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kimi_trt")
def main() -> None:
    """Kimi-K2 compiled-inference toolchain: HF checkpoint -> per-rank engines -> serving.

    \b
    Typical flow:
      kimi-trt plan  --config build_configs/b200_ep8.yaml
      kimi-trt build --config build_configs/b200_ep8.yaml
      mpirun -np 8 kimi-trt run --engine-dir engines/k2-b200-ep8 --chat "Hello"
    """


@main.command()
@click.option(
    "--preset",
    type=click.Choice(["tiny", "tiny-groups", "small", "k2-shapes"]),
    default="tiny",
    show_default=True,
)
@click.option("--layers", type=int, help="Override num_hidden_layers.")
@click.option("--experts", type=int, help="Override n_routed_experts.")
@click.option("--vocab", type=int, help="Override vocab_size.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config.json field (JSON value), repeatable.",
)
@click.option("--no-fp8", is_flag=True, help="Write BF16 weights instead of block-FP8.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=PATH_TYPE, required=True, help="Output directory.")
@click.option("--quiet", is_flag=True)
def synth(preset, layers, experts, vocab, overrides, no_fp8, seed, out, quiet) -> None:
    """Write a synthetic HF checkpoint laid out exactly like Kimi-K2's (random weights)."""
    from kimi_trt.convert.synth import parse_overrides, preset_config, write_synthetic_checkpoint

    extra = parse_overrides(overrides)
    cfg = preset_config(
        preset, layers=layers, experts=experts, vocab=vocab, fp8=not no_fp8, overrides=extra
    )
    summary = write_synthetic_checkpoint(cfg, out, seed=seed, progress=not quiet)
    click.echo(
        f"wrote {summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in {summary['files']} files to {out}"
    )


@main.command()
@click.argument("path", type=PATH_TYPE)
@JSON_OPTION
def inspect(path: Path, as_json: bool) -> None:
    """Describe an HF checkpoint, a per-rank checkpoint or an engine dir."""
    from kimi_trt.inspect import describe, render

    info = describe(path)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@click.option(
    "--checkpoint",
    type=PATH_TYPE,
    help="HF checkpoint dir (config.json + safetensors). Omit with --verify to only re-check --out.",
)
@click.option("--out", type=PATH_TYPE, required=True, help="Output directory.")
@click.option("--tp", type=int, default=1, show_default=True, help="World size (ranks).")
@click.option("--ep", type=int, help="Expert-parallel ways [default: tp / moe-tp].")
@click.option("--moe-tp", type=int, help="Ways each expert is split [default: tp / ep].")
@click.option("--attention-dp", is_flag=True, help="Replicate attention (data-parallel).")
@click.option(
    "--format",
    "formats",
    multiple=True,
    metavar="CLASS=FORMAT",
    help="Weight format of a tensor class, repeatable: attention, dense_mlp, shared_expert, "
    "experts = fp8_block|fp8_ue8m0|int8_wo|bf16|fp32; embeddings = bf16|fp32; "
    "all = every class that can take the format (a CLASS=FORMAT given too wins). "
    "Default: fp8_block everywhere, bf16 embeddings.",
)
@click.option("--verify", is_flag=True, help="Re-hash every output file against the manifest.")
@click.option(
    "--strict",
    is_flag=True,
    help="Unknown source tensors, NaN/Inf weights and absurd FP8 scales are errors, not warnings.",
)
@click.option(
    "--jobs", type=int, help="Ranks converted in parallel [default: min(world, CPUs, 4)]."
)
@click.option("--quiet", is_flag=True, help="No progress bar; summary only.")
def convert(
    checkpoint, out, tp, ep, moe_tp, attention_dp, formats, verify, strict, jobs, quiet
) -> None:
    """HF block-FP8 checkpoint -> per-rank checkpoint (config.json, rank{N}.safetensors,
    manifest.json), streamed in bounded memory, resumable after a crash.

    \b
    Example (8 GPUs, experts split 8 ways, attention data-parallel):
      kimi-trt convert --checkpoint Kimi-K2-Instruct --out ckpt-ep8 --tp 8 --ep 8 --attention-dp
    Rerunning the same command reuses every complete, checksummed rank file. The format
    is documented in docs/per-rank-checkpoint.md.
    """
    from kimi_trt.convert.cli_support import convert_command

    click.echo(
        convert_command(
            checkpoint, out, tp, ep, moe_tp, attention_dp, formats, verify, strict, jobs, quiet
        )
    )


@main.command()
@BUILD_CONFIG_OPTION
@click.option(
    "--model-config",
    type=PATH_TYPE,
    help="config.json to plan with [default: <checkpoint>/config.json, else the shipped "
    "Kimi-K2-Instruct config].",
)
@JSON_OPTION
def plan(config_path: Path, model_config: Path | None, as_json: bool) -> None:
    """Per-GPU memory plan of a build config, from configs alone (no weights are read).

    \b
    Prints per-rank weight bytes by tensor class, activations, KV cache bytes per token,
    the KV budget and how many max_seq_len sequences fit, the verdict, and the smallest
    layout that fits the configured GPU. Weights are counted as the backend holds them
    (block-FP8 for TensorRT-LLM's PyTorch backend, decoded fp32/bf16 for the torch
    executor), and the backend/format/GPU rules `build` applies are applied here too.
    Exit 0 when the layout fits, 2 when it does not (the reason as one line on stderr) or
    when a config is missing or invalid.
    """
    from kimi_trt.plan import load_plan, require_fit
    from kimi_trt.plan_report import plan_to_dict, render_plan

    result = load_plan(config_path, model_config)
    click.echo(json.dumps(plan_to_dict(result), indent=2) if as_json else render_plan(result))
    require_fit(result)


@main.command()
@BUILD_CONFIG_OPTION
@click.option(
    "--stop-after",
    type=click.Choice(["plan", "convert", "compile", "package"]),
    help="Stop after this stage (default: run all four).",
)
@click.option(
    "--checkpoint", type=PATH_TYPE, help="HF checkpoint dir instead of the YAML's 'checkpoint'."
)
@click.option("--output-dir", type=PATH_TYPE, help="Engine dir instead of the YAML's 'output_dir'.")
def build(
    config_path: Path, stop_after: str | None, checkpoint: Path | None, output_dir: Path | None
) -> None:
    """HF checkpoint -> engine dir: plan, convert, compile, package.

    \b
    plan     memory plan + backend/format/GPU checks; refuses before any weight is read
    convert  torch/trtllm: per-rank checkpoint (resumable, checksummed); llmapi: the HF
             checkpoint's headers, shapes and scales checked (+ UE8M0 scales if asked)
    compile  trtllm: one TensorRT-LLM engine per rank (GPU host; exit 3 elsewhere, with
             the command that finishes the build); torch: the checkpoint itself, runnable
             by `mpirun -np N kimi-trt run`; llmapi: the LLM-API options file
    package  tokenizer files + manifest.json; llmapi: then exit 3 where tensorrt_llm is
             missing, with the command that checks and runs the dir on a GPU host
    Paths in the YAML are relative to the YAML's directory; --checkpoint and --output-dir
    (relative to the current directory) replace them.
    Rerunning skips every stage whose outputs still verify (checksums + config hash) and
    redoes the stages a changed config affects. Progress and timings go to stderr.
    Multi-host engine builds: `--stop-after convert` once, then
    `mpirun -np N kimi-trt build --config YAML`: each process compiles its share.
    """
    from kimi_trt.build import run_build

    overrides = {"checkpoint": checkpoint, "output_dir": output_dir}
    result = run_build(
        config_path, stop_after, log=lambda s: click.echo(s, err=True), overrides=overrides
    )
    click.echo(result.summary())


@main.command()
@engine_dir_option("Engine dir to run.")
@click.option("--prompt", help="Raw text prompt (needs a tokenizer).")
@click.option("--chat", help="One user message, rendered with the chat template.")
@click.option("--prompt-ids", help="Comma-separated token ids, e.g. 1,2,3.")
@click.option(
    "--input-file",
    type=PATH_TYPE,
    help='JSON lines: {"prompt"|"chat"|"messages"|"prompt_ids": ...} per line.',
)
@click.option(
    "--tokenizer-dir",
    type=PATH_TYPE,
    help="Directory with tiktoken.model [default: the engine dir].",
)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option(
    "--temperature", type=float, default=0.0, show_default=True, help="0 = greedy decoding."
)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = no top-k cut.")
@click.option("--seed", type=int, help="Sampling seed (reproducible sampling).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt on stdout.")
@click.option(
    "--keep-special-tokens", is_flag=True, help="Print special tokens (left out by default)."
)
def run(
    engine_dir: Path,
    prompt: str | None,
    chat: str | None,
    prompt_ids: str | None,
    input_file: Path | None,
    tokenizer_dir: Path | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    as_json: bool,
    keep_special_tokens: bool,
) -> None:
    """Generate from an engine dir. Multi-rank: `mpirun -np N kimi-trt run ...`.

    \b
    One process per rank (Open MPI, MPICH, Slurm srun, or a single process); rank 0
    reads the prompts and prints. Stops at eos / <|im_end|> or --max-new-tokens.
    With --json each prompt gives one line:
      {"prompt_tokens": [...], "tokens": [...], "text": "...", "finish_reason": "..."}
    """
    from kimi_trt.run_command import PromptSource, run_command
    from kimi_trt.runtime.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    src = PromptSource(prompt, chat, prompt_ids, input_file)
    sys.exit(run_command(engine_dir, src, params, as_json, tokenizer_dir, keep_special_tokens))


@main.command()
@engine_dir_option("Engine dir to prove (built from the shipped tiny model).")
def verify(engine_dir: Path) -> None:
    """Run fixed prompts on an engine dir and compare with shipped transformers references.

    \b
    Works on every backend (torch executor on CPU/GPU, TensorRT-LLM's PyTorch backend,
    TensorRT-LLM engines); multi-rank dirs under mpirun (rank 0 prints). Checks: every
    manifest file's checksum, then per prompt the greedy tokens and the logits behind them
    against transformers' DeepseekV3 on the same weights. Prints a pass/fail table; exit 1
    when a check fails. The references are for the shipped tiny model: build
    build_configs/tiny_*.yaml with the backend and layout to prove, then verify it.
    """
    from kimi_trt.verify import verify_command

    sys.exit(verify_command(engine_dir))


@main.command("triton-repo")
@engine_dir_option()
@click.option("--out", type=PATH_TYPE, required=True, help="Repository dir.")
@click.option("--tokenizer-dir", type=PATH_TYPE, help="Default: the engine dir's.")
@click.option(
    "--no-streaming",
    is_flag=True,
    help="tensorrt_llm not decoupled (one response per request); torch repos: kimi_sync.",
)
@click.option(
    "--max-batch-size",
    "triton_max_batch_size",
    type=click.IntRange(min=1),
    help="Requests batched at once (tensorrt_llm and kimi models) [default: the engine's].",
)
@click.option("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9, show_default=True)
@click.option(
    "--batch-scheduler-policy",
    type=click.Choice(["guaranteed_no_evict", "max_utilization"]),
    default="guaranteed_no_evict",
    show_default=True,
)
@click.option(
    "--batching-strategy",
    type=click.Choice(["inflight_fused_batching", "V1"]),
    default="inflight_fused_batching",
    show_default=True,
)
@click.option("--enable-kv-cache-reuse", is_flag=True)
@click.option("--enable-chunked-context", is_flag=True)
@click.option("--gpu-device-ids", help="Comma-separated, one per rank [default: 0..world-1].")
@SCHEDULING_OPTIONS
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def triton_repo(engine_dir, out, tokenizer_dir, no_streaming, force, **options) -> None:
    """Write a Triton model repository for an engine dir.

    \b
    TensorRT-LLM engines: tensorrtllm_backend's inflight-batching layout (preprocessing,
    tensorrt_llm, postprocessing, ensemble) with every tensorrt_llm parameter filled in.
    torch-executor engine dirs: `kimi` (decoupled Python model running our runtime,
    streams tokens) and `kimi_sync` (one response per request, for HTTP clients).
    Then: kimi-trt triton-server --model-repository OUT
    """
    from kimi_trt.serving.cli_support import triton_repo_command

    click.echo(
        triton_repo_command(
            engine_dir,
            out,
            force,
            tokenizer_dir=tokenizer_dir,
            streaming=not no_streaming,
            **options,
        )
    )


@main.command("triton-server")
@click.option("--model-repository", "repo", type=PATH_TYPE, required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=PORT_TYPE, default=8000, show_default=True)
@click.option("--grpc-port", type=PORT_TYPE, default=8001, show_default=True)
@click.option("--metrics-port", type=PORT_TYPE, default=8002, show_default=True)
@click.option("--log-file", type=PATH_TYPE, help="tritonserver's log.")
def triton_server(repo, host, http_port, grpc_port, metrics_port, log_file) -> None:
    """Run the tritonserver bundled with nvidia-pytriton on a repository from triton-repo.

    Multi-rank engines start in leader mode: one process per rank under mpirun, rank 0
    serves. Runs until interrupted (Ctrl-C / SIGTERM stop it cleanly).
    """
    from kimi_trt.serving.cli_support import triton_server_command

    sys.exit(triton_server_command(repo, host, http_port, grpc_port, metrics_port, log_file))


@main.command("triton-worker", hidden=True)
@engine_dir_option()
def triton_worker(engine_dir) -> None:
    """Rank > 0 of a leader-mode Triton job (started by triton-server)."""
    from kimi_trt.serving.cli_support import triton_worker_command

    triton_worker_command(engine_dir)


@main.command()
@engine_dir_option()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT_TYPE, default=8000, show_default=True)
@click.option(
    "--triton",
    "triton_url",
    metavar="HOST:PORT|auto",
    help="Use this Triton (gRPC); auto: start the bundled tritonserver for this engine dir.",
)
@click.option("--triton-model", help="Triton model [default: kimi or tensorrt_llm].")
@click.option("--model-name", default="kimi-k2", show_default=True, help="Served model id.")
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    help="torch executor: requests generating at once [default: the engine dir's, else 8].",
)
@SCHEDULING_OPTIONS
@click.option("--default-max-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=16.0,
    show_default=True,
    help="Largest request body accepted (413 above it).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"], False),
    default="info",
    show_default=True,
)
@click.option(
    "--constrain-tool-calls/--no-constrain-tool-calls",
    default=True,
    show_default=True,
    help="Decode opened tool calls under a grammar (declared names, schema-valid arguments).",
)
def serve(engine_dir, host, port, triton_url, triton_model, model_name, **options) -> None:
    """OpenAI-compatible API (+ Anthropic /v1/messages) for an engine dir.

    \b
    GET  /health /metrics /v1/models
    POST /v1/chat/completions /v1/completions /v1/messages
    Tokens come from the runtime in this process (multi-rank: run under mpirun, rank 0
    serves) or, with --triton, from a Triton server holding this engine's repository.
    """
    from kimi_trt.serving.openai_server import serve as run_server

    run_server(engine_dir, host, port, triton_url, triton_model, model_name, **options)


if __name__ == "__main__":
    main()
