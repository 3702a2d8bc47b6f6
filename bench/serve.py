"""Benchmark: `kimi-trt serve` under load - 32 concurrent streaming clients x 4 requests each.

In one run, on the synthetic tiny model (torch executor on this machine's CPUs):
  1. serial      the 128 chat requests one after another (streaming, greedy)
  2. concurrent  32 clients on loopback, each sending its 4 requests back to back
Both phases use the official `openai` async client against the same server process, the
same prompts and max_tokens. Checks: every request completes, no errors, and each greedy
output equals the serial run's. Reports requests/s, generated tokens/s and p50/p99 time
to first token (client side: request sent -> first content chunk) of both phases, and the
concurrent/serial throughput ratio (what request batching buys).
Both backends run side by side (`--backend both`, the default): the in-process runtime,
and tritonserver with the generated repository behind `kimi-trt serve --triton`; both
servers are up at once and each phase runs on one backend right after the other, so they
see the same machine load (the CPUs may be shared).
Results: bench/results/serve.json.

    .venv/bin/python bench/serve.py [--clients 32] [--requests 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import openai  # noqa: E402

from kimi_trt.config import Parallelism, WeightFormats  # noqa: E402
from kimi_trt.convert.converter import run_conversion  # noqa: E402
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint  # noqa: E402
from kimi_trt.serving.triton_repo import write_triton_repo  # noqa: E402
from kimi_trt.serving.triton_server import TritonServer, free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "serve.json"
TOPICS = ["rivers", "tea", "chess", "comets", "bridges", "owls", "jazz", "glaciers"]


def make_engine(work: Path) -> Path:
    hf, engine = work / "hf", work / "engine"
    write_synthetic_checkpoint(preset_config("tiny"), hf, seed=0, progress=False)
    run_conversion(hf, engine, Parallelism(tp=1), WeightFormats(), progress=False)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copyfile(hf / name, engine / name)
    return engine


def prompts(clients: int, requests: int) -> list[list[str]]:
    """Distinct prompts: client c's request r."""
    return [
        [
            f"Client {c} asks #{r}: tell me about {TOPICS[(c + r) % len(TOPICS)]}."
            for r in range(requests)
        ]
        for c in range(clients)
    ]


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    text, finish = [], None
    stream = await client.chat.completions.create(
        model="kimi-k2",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if first is None and (delta.content or delta.tool_calls):
            first = time.perf_counter() - start
        text.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    return {"text": "".join(text), "ttft": first, "tokens": tokens, "finish": finish}


async def run_phase(base: str, plan: list[list[str]], max_tokens: int, concurrent: bool) -> dict:
    client = openai.AsyncOpenAI(
        base_url=base + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=600,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=256)),
    )
    results: dict[tuple[int, int], dict] = {}
    errors: list[str] = []

    async def client_loop(c: int) -> None:
        for r, prompt in enumerate(plan[c]):
            try:
                results[(c, r)] = await one_request(client, prompt, max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"client {c} request {r}: {e}")

    start = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(client_loop(c) for c in range(len(plan))))
    else:
        for c in range(len(plan)):
            await client_loop(c)
    wall = time.perf_counter() - start
    await client.close()
    ttfts = sorted(v["ttft"] for v in results.values() if v["ttft"] is not None)
    return {
        "results": results,
        "errors": errors,
        "wall_s": wall,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(v["tokens"] for v in results.values()) / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
    }


def start_api(engine: Path, work: Path, backend: str):
    port = free_port()
    cmd = [sys.executable, "-m", "kimi_trt.cli", "serve", "--engine-dir", str(engine)]
    cmd += ["--port", str(port), "--log-level", "warning"]
    triton = None
    if backend == "triton":
        write_triton_repo(engine, work / "repo")
        triton = TritonServer(work / "repo", log_file=work / "triton.log").start()
        cmd += ["--triton", triton.grpc_url]
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, triton, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"server did not start; see {work / 'serve.log'}")


def summary(phase: dict) -> dict:
    return {k: v for k, v in phase.items() if k != "results"}


def check(serial: dict, concurrent: dict, expected: int) -> dict:
    """Numbers and checks of one backend: all complete, no errors, greedy == serial."""
    mismatches = [
        list(k)
        for k, v in concurrent["results"].items()
        if serial["results"].get(k, {}).get("text") != v["text"]
    ]
    return {
        "serial": summary(serial),
        "concurrent": summary(concurrent),
        "concurrent_over_serial_throughput": concurrent["requests_per_s"]
        / serial["requests_per_s"],
        "all_completed": serial["requests"] == expected == concurrent["requests"],
        "no_errors": not serial["errors"] and not concurrent["errors"],
        "greedy_outputs_equal_serial": not mismatches,
        "mismatched_requests": mismatches,
    }


def bench(engine: Path, work: Path, backends: list[str], plan, max_tokens: int) -> dict:
    """All servers up at once; each phase runs on every backend back to back, so the
    machine's load (shared CPUs) is as alike as it can be between them."""
    servers = {}
    try:
        for backend in backends:
            (work / backend).mkdir(parents=True, exist_ok=True)
            servers[backend] = start_api(engine, work / backend, backend)
        phases: dict[str, dict] = {b: {} for b in backends}
        for concurrent in (False, True):
            for backend, (_, _, base) in servers.items():
                asyncio.run(run_phase(base, [[plan[0][0]]], max_tokens, False))  # warm-up
                name = "concurrent" if concurrent else "serial"
                phases[backend][name] = asyncio.run(run_phase(base, plan, max_tokens, concurrent))
    finally:
        for proc, triton, _ in servers.values():
            proc.terminate()
            proc.wait(30)
            if triton is not None:
                triton.stop()
    expected = sum(len(p) for p in plan)
    return {b: check(p["serial"], p["concurrent"], expected) for b, p in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--backend", choices=["runtime", "triton", "both"], default="both")
    ap.add_argument("--work", type=Path, help="Scratch dir (default: a temp dir).")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimi_bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    engine = make_engine(work)
    plan = prompts(args.clients, args.requests)
    backends = ["runtime", "triton"] if args.backend == "both" else [args.backend]
    report: dict = {
        "benchmark": "serve",
        "model": "synthetic tiny (torch executor, CPU)",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
    }
    report.update(bench(engine, work, backends, plan, args.max_tokens))
    if len(backends) == 2:
        report["triton_over_runtime_concurrent_throughput"] = (
            report["triton"]["concurrent"]["requests_per_s"]
            / report["runtime"]["concurrent"]["requests_per_s"]
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    checks = ("all_completed", "no_errors", "greedy_outputs_equal_serial")
    sys.exit(0 if all(report[b][c] for b in backends for c in checks) else 1)


if __name__ == "__main__":
    main()
