"""The serving commands' work, kept out of cli.py (which only parses options)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from kimi_trt.errors import UserError


def parse_device_ids(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--gpu-device-ids {text!r}: expected comma-separated integers") from None


def triton_repo_command(engine_dir: Path, out: Path, force: bool, **options: Any) -> str:
    from kimi_trt.runtime.scheduling import Scheduling
    from kimi_trt.serving.repo_spec import RepoOptions
    from kimi_trt.serving.triton_repo import write_triton_repo

    options["gpu_device_ids"] = parse_device_ids(options.get("gpu_device_ids"))
    options["scheduling"] = Scheduling(
        options.pop("batching"),
        options.pop("prefill_chunk"),
        options.pop("prefix_cache"),
        options.pop("batch_window_ms"),
    )
    summary = write_triton_repo(engine_dir, out, RepoOptions(**options), force=force)
    lines = [
        f"wrote Triton model repository {summary['repository']} "
        f"({summary['engine_kind']} engine, world size {summary['world_size']})",
        f"  models   {', '.join(summary['models'])}",
        f"  serve    kimi-trt triton-server --model-repository {out}",
        f"  api      kimi-trt serve --engine-dir {engine_dir} --triton 127.0.0.1:8001",
    ]
    return "\n".join(lines)


def repo_engine(repo: Path) -> tuple[Path, str]:
    """The engine dir and kind a repository made by `kimi-trt triton-repo` points at."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model, key, kind in (
        ("kimi", "engine_dir", "torch"),
        ("tensorrt_llm", "gpt_model_path", "trtllm"),
        ("tensorrt_llm", "engine_dir", "llmapi"),
    ):
        path = repo / model / "config.pbtxt"
        if path.is_file():
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            if key in config.parameters:
                return Path(config.parameters[key].string_value), kind
    raise UserError(f"{repo}: no kimi/ or tensorrt_llm/ model made by `kimi-trt triton-repo`")


def triton_server_command(
    repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, log_file: Path | None
) -> int:
    """Run tritonserver (leader mode under mpirun for multi-rank engines) until it exits."""
    from kimi_trt.serving.repo_spec import summarize_engine
    from kimi_trt.serving.triton_server import ServerPorts, TritonServer

    engine_dir, kind = repo_engine(repo)
    summary = summarize_engine(engine_dir)
    server = TritonServer(
        repo,
        engine_dir=engine_dir,
        world_size=summary.world_size,
        engine_kind=kind,
        host=host,
        ports=ServerPorts(http_port, grpc_port, metrics_port),
        log_file=log_file,
    )
    # SIGTERM must run the `finally` below: tritonserver runs in its own session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    server.start(timeout=600)
    print(
        f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, "
        f"metrics {server.metrics_url} ({summary.world_size} rank(s))",
        flush=True,
    )
    try:
        return server.wait()
    finally:
        server.stop()


def triton_worker_command(engine_dir: Path) -> None:
    """A rank > 0 of a leader-mode Triton job: follow rank 0's engine until it shuts down."""
    from kimi_trt.runtime.engine import load_engine
    from kimi_trt.runtime.failure import run_this_rank

    def this_rank() -> int:
        engine = load_engine(engine_dir)
        if engine.is_driver:
            raise UserError(
                "triton-worker runs as rank 1..N-1 under mpirun; rank 0 is tritonserver"
            )
        engine.worker_loop()
        return 0

    run_this_rank(this_rank)
