"""Benchmark: `kimi-trt serve` for agents - continuous batching and prefix reuse, before/after.

Three servers on the synthetic tiny model (torch executor on this machine's CPUs) are up
at once, and every scenario runs on each of them back to back, so they see the same load:
  before   in-process runtime, `--batching static --no-prefix-cache` (a batch runs to its
           end while newcomers wait; every prompt computed in full)
  after    in-process runtime, the defaults (continuous batching, 256-token prefill
           chunks, prefix cache)
  triton   the same defaults in the Triton `kimi` model, behind `serve --triton`
Scenarios (official `openai` async client, streaming, greedy):
  idle      time to first token (TTFT) of a short request on an idle server
  loaded    TTFT of short requests sent every 0.25 s while long requests (long prompts,
            long completions) stream; target: within 3x the idle TTFT
  prefix    agent requests: a long system prompt + tool declarations, then a second
            request with the same prefix and another question; TTFT of each (cold, warm)
  streams   32 concurrent clients x N requests: throughput and TTFT p50/p99; every
            greedy output must equal the serial run's (on `after`)
Results: bench/results/serve.json (ratios are what to read: the machine is shared).

    .venv/bin/python bench/serve.py [--clients 32] [--requests 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
from tiny_engine import make_engine  # noqa: E402 - bench/ is the script's dir

from kimi_trt.runtime.scheduling import Scheduling  # noqa: E402
from kimi_trt.serving.repo_spec import RepoOptions  # noqa: E402
from kimi_trt.serving.triton_repo import write_triton_repo  # noqa: E402
from kimi_trt.serving.triton_server import TritonServer, free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "serve.json"
TOPICS = ["rivers", "tea", "chess", "comets", "bridges", "owls", "jazz", "glaciers"]
SERVERS = {
    "before": ["--batching", "static", "--no-prefix-cache"],
    "after": [],
    "triton": [],
}
LONG_TEXT = " ".join(
    f"Paragraph {i}: the history of {t} is long and varied." for i, t in enumerate(TOPICS * 6)
)


def tools(variant: int) -> list[dict]:
    """Four tool declarations with detailed schemas (an agent's usual prefix)."""
    out = []
    for i, name in enumerate(["search", "weather", "flights", "email"]):
        props = {
            f"field_{j}": {
                "type": "string",
                "description": f"Field {j} of {name}, variant {variant}.",
            }
            for j in range(3)
        }
        out.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": f"Tool {i}: {name}. Use it when the user asks about {name}.",
                    "parameters": {"type": "object", "properties": props, "required": ["field_0"]},
                },
            }
        )
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def one_request(client, messages: list[dict], max_tokens: int, tools=None) -> dict:
    start = time.perf_counter()
    first, text, tokens, finish = None, [], 0, None
    extra = {"tools": tools} if tools else {}
    stream = await client.chat.completions.create(
        model="kimi-k2",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
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
    if first is None:  # nothing streamed (e.g. an immediate stop): first = whole request
        first = time.perf_counter() - start
    end = time.perf_counter()
    return {"text": "".join(text), "ttft": first, "tokens": tokens, "finish": finish, "end": end}


def client_for(base: str):
    return openai.AsyncOpenAI(
        base_url=base + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=600,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=256)),
    )


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


# ---- scenarios ------------------------------------------------------------------------
async def idle(base: str, n: int = 5) -> dict:
    client = client_for(base)
    ttfts = [(await one_request(client, user(f"Say hello #{i}."), 4))["ttft"] for i in range(n)]
    await client.close()
    return {"ttft_p50_s": statistics.median(ttfts), "ttfts_s": ttfts}


async def loaded(base: str, n_long: int, long_tokens: int, n_short: int) -> dict:
    """Short requests sent every 0.25 s (each on its own, not waiting for the previous
    one) while `n_long` long streams run."""
    client = client_for(base)
    longs = [
        asyncio.create_task(
            one_request(client, user(f"{LONG_TEXT[:1000]} Summarise topic {i}."), long_tokens)
        )
        for i in range(n_long)
    ]
    await asyncio.sleep(1.0)  # the long ones are prefilled and streaming

    async def short(i: int) -> dict:
        await asyncio.sleep(0.25 * i)
        sent = time.perf_counter()
        return {**await one_request(client, user(f"Say hello #{i}."), 4), "sent": sent}

    shorts = await asyncio.gather(*(short(i) for i in range(n_short)))
    long_results = await asyncio.gather(*longs)
    await client.close()
    first_long_end = min(r["end"] for r in long_results)
    ttfts = [s["ttft"] for s in shorts]
    return {
        "long_requests": n_long,
        "long_prompt_chars": 1000,
        "long_completion_tokens": [r["tokens"] for r in long_results],
        "short_requests": n_short,
        "shorts_answered_while_all_long_ran": sum(
            s["sent"] + s["ttft"] < first_long_end for s in shorts
        ),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_max_s": max(ttfts),
        "ttfts_s": ttfts,
    }


async def prefix(base: str, pairs: int = 3) -> dict:
    """Per pair: a new tool set + system prompt (cold), then the same prefix again (warm)."""
    client = client_for(base)
    cold, warm = [], []
    for k in range(pairs):
        system = {"role": "system", "content": f"You are agent {k}. {LONG_TEXT[:300]}"}
        first = await one_request(client, [system, *user("What is the weather?")], 4, tools(k))
        second = await one_request(client, [system, *user("Find me a flight.")], 4, tools(k))
        cold.append(first["ttft"])
        warm.append(second["ttft"])
    await client.close()
    return {
        "pairs": pairs,
        "cold_ttft_p50_s": statistics.median(cold),
        "warm_ttft_p50_s": statistics.median(warm),
        "warm_over_cold": statistics.median(warm) / statistics.median(cold),
    }


def stream_prompts(clients: int, requests: int) -> list[list[str]]:
    return [
        [
            f"Client {c} asks #{r}: tell me about {TOPICS[(c + r) % len(TOPICS)]}."
            for r in range(requests)
        ]
        for c in range(clients)
    ]


async def streams(base: str, plan: list[list[str]], max_tokens: int, concurrent: bool) -> dict:
    client = client_for(base)
    results: dict[str, dict] = {}
    errors: list[str] = []

    async def client_loop(c: int) -> None:
        for r, prompt in enumerate(plan[c]):
            try:
                results[f"{c}/{r}"] = await one_request(client, user(prompt), max_tokens)
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
    ttfts = [v["ttft"] for v in results.values()]
    return {
        "texts": {k: v["text"] for k, v in results.items()},
        "errors": errors,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(v["tokens"] for v in results.values()) / wall,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p99_s": pct(ttfts, 0.99),
    }


# ---- servers --------------------------------------------------------------------------
def start_api(engine: Path, work: Path, name: str):
    port = free_port()
    cmd = [sys.executable, "-m", "kimi_trt.cli", "serve", "--engine-dir", str(engine)]
    cmd += ["--port", str(port), "--log-level", "warning", *SERVERS[name]]
    triton = None
    if name == "triton":
        write_triton_repo(engine, work / "repo", RepoOptions(scheduling=Scheduling()))
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
    raise RuntimeError(f"server {name} did not start; see {work / 'serve.log'}")


def scrape(base: str, names: tuple[str, ...]) -> dict[str, float]:
    """Values of the loop's metrics on /metrics (in-process servers)."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        for name in names:
            if line.startswith((f"kimi_trt_{name} ", f"kimi_trt_{name}_total ")):
                out[name] = float(line.split()[-1])
    return out


def run_all(engine: Path, work: Path, names: list[str], args) -> dict:
    servers = {}
    report: dict[str, dict] = {n: {} for n in names}
    plan = stream_prompts(args.clients, args.requests)
    try:
        for name in names:
            (work / name).mkdir(parents=True, exist_ok=True)
            servers[name] = start_api(engine, work / name, name)
        bases = {n: s[2] for n, s in servers.items()}
        for base in bases.values():
            asyncio.run(one_request_once(base))  # warm-up
        for name, base in bases.items():
            report[name]["idle"] = asyncio.run(idle(base))
        for name, base in bases.items():
            report[name]["loaded"] = asyncio.run(
                loaded(base, args.long, args.long_tokens, args.short)
            )
        for name, base in bases.items():
            report[name]["prefix"] = asyncio.run(prefix(base))
        serial = asyncio.run(streams(bases[names[-1]], plan, args.max_tokens, False))
        for name, base in bases.items():
            report[name]["streams"] = asyncio.run(streams(base, plan, args.max_tokens, True))
        for name, base in bases.items():
            if name != "triton":
                report[name]["metrics"] = scrape(
                    base, ("prefix_cache_hits", "prefix_cache_queries", "prefix_cache_hit_tokens")
                )
    finally:
        for proc, triton, _ in servers.values():
            proc.terminate()
            proc.wait(30)
            if triton is not None:
                triton.stop()
    for r in report.values():
        s = r["streams"]
        texts = s.pop("texts")
        s["mismatched_requests"] = [k for k, t in texts.items() if serial["texts"].get(k) != t]
        s["greedy_outputs_equal_serial"] = not s["mismatched_requests"] and len(texts) == len(
            serial["texts"]
        )
        r["loaded_over_idle_ttft"] = r["loaded"]["ttft_p50_s"] / r["idle"]["ttft_p50_s"]
    serial.pop("texts")
    report["serial_reference"] = serial
    return report


async def one_request_once(base: str) -> None:
    client = client_for(base)
    await one_request(client, user("warm up"), 2)
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--long", type=int, default=4, help="Long requests in the loaded scenario.")
    ap.add_argument("--long-tokens", type=int, default=300)
    ap.add_argument("--short", type=int, default=8, help="Short requests sent under load.")
    ap.add_argument("--servers", default="before,after,triton")
    ap.add_argument("--work", type=Path, help="Scratch dir (default: a temp dir).")
    args = ap.parse_args()
    names = [n for n in args.servers.split(",") if n]
    work = args.work or Path(tempfile.mkdtemp(prefix="kimi_bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    engine = make_engine(work)
    report: dict = {
        "benchmark": "serve",
        "model": "synthetic tiny (torch executor, CPU)",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "servers": {n: " ".join(SERVERS[n]) or "defaults" for n in names},
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
    }
    report.update(run_all(engine, work, names, args))
    if "before" in names and "after" in names:
        b, a = report["before"], report["after"]
        report["after_vs_before"] = {
            "loaded_ttft_p50": a["loaded"]["ttft_p50_s"] / b["loaded"]["ttft_p50_s"],
            "warm_prefix_ttft_p50": a["prefix"]["warm_ttft_p50_s"] / b["prefix"]["warm_ttft_p50_s"],
            "streams_ttft_mean": a["streams"]["ttft_mean_s"] / b["streams"]["ttft_mean_s"],
            "streams_ttft_p99": a["streams"]["ttft_p99_s"] / b["streams"]["ttft_p99_s"],
            "streams_throughput": a["streams"]["requests_per_s"] / b["streams"]["requests_per_s"],
        }
    report["targets"] = {
        n: {"loaded_ttft_within_3x_idle": report[n]["loaded_over_idle_ttft"] <= 3.0}
        for n in names
        if n != "before"
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = all(
        report[n]["streams"]["greedy_outputs_equal_serial"] and not report[n]["streams"]["errors"]
        for n in names
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
