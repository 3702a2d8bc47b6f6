"""Benchmark: what a 40 MB request body costs `kimi-trt serve` - event-loop stall and memory.

In one run, on the synthetic tiny model, servers started side by side on this machine:
  1. limit    this tree with its default body limit (--max-body-mb 16): the body is refused
  2. raised   this tree with --max-body-mb 64: the body is read, parsed, rendered and
              tokenized (in a worker thread), then refused for its length (400)
  3. baseline (with --baseline REF) the same tree at git REF - e.g. the commit before the
              body limit, where all of that ran on the event loop - given the same body
While the 40 MB chat request is in flight a client polls GET /health every 20 ms; the
stall is the longest /health latency seen (what every other client waited), reported
with the request's own time and status and the server's peak RSS growth (VmHWM).
Each server is measured `--repeat` times, interleaved; medians are reported.
Results: bench/results/serve_body.json.

    .venv/bin/python bench/serve_body.py [--mb 40] [--repeat 3] [--baseline REF]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from tiny_engine import make_engine  # noqa: E402 - bench/ is the script's dir

from kimi_trt.serving.triton_server import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "serve_body.json"


def export_tree(ref: str, work: Path) -> Path:
    """The repository at `ref` (git archive), importable through PYTHONPATH."""
    out = work / "baseline-tree"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True)
    archive.check_returncode()
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def body_of(mb: float) -> bytes:
    """A chat request of `mb` MB: one user message of ordinary words."""
    words = b"the quick brown fox jumps over the lazy dog " * int(mb * 2**20 / 44)
    head = b'{"model": "kimi-k2", "max_tokens": 4, "messages": [{"role": "user", "content": "'
    return head + words + b'"}]}'


class Server:
    def __init__(self, name: str, engine: Path, work: Path, tree: Path | None, extra: list[str]):
        self.name, self.port = name, free_port()
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        cmd = [sys.executable, "-m", "kimi_trt.cli", "serve", "--engine-dir", str(engine)]
        cmd += ["--port", str(self.port), "--log-level", "warning", *extra]
        self.log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        cwd = tree or REPO  # `python -m` puts the working dir first on sys.path
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} server did not start; see {work / f'{name}.log'}")

    def hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def measure(server: Server, body: bytes) -> dict:
    """One big request while /health is polled; the longest /health latency seen."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.base, timeout=120) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get("/health")
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

    hwm = server.hwm_kb()
    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    start = time.perf_counter()
    r = httpx.post(
        server.base + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=300,
    )
    took = time.perf_counter() - start
    time.sleep(0.2)
    done.set()
    poller.join()
    return {
        "status": r.status_code,
        "request_s": round(took, 3),
        "health_max_s": round(max(latencies), 3),
        "health_polls": len(latencies),
        "rss_growth_mb": round((server.hwm_kb() - hwm) / 1024, 1),
    }


def median_of(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "status"}
    out["status"] = sorted({r["status"] for r in runs})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="git ref to compare with (e.g. the commit before)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kimi_bench_body_"))
    try:
        engine = make_engine(work)
        body = body_of(args.mb)
        servers = [
            Server("limit", engine, work, None, []),
            Server("raised", engine, work, None, ["--max-body-mb", str(2 * args.mb)]),
        ]
        if args.baseline:
            tree = export_tree(args.baseline, work)
            servers.append(Server("baseline", engine, work, tree, []))
        runs: dict[str, list[dict]] = {s.name: [] for s in servers}
        for _ in range(args.repeat):
            for server in servers:
                runs[server.name].append(measure(server, body))
        for server in servers:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "body_mb": round(len(body) / 2**20, 1),
        "repeat": args.repeat,
        "baseline": args.baseline,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "servers": {name: {"median": median_of(r), "runs": r} for name, r in runs.items()},
    }
    if args.baseline:
        base = result["servers"]["baseline"]["median"]["health_max_s"]
        for name in ("limit", "raised"):
            stall = result["servers"][name]["median"]["health_max_s"]
            result[f"stall_ratio_baseline_over_{name}"] = round(base / max(stall, 1e-3), 1)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "servers"}, indent=2))
    for name, r in result["servers"].items():
        print(name, r["median"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
