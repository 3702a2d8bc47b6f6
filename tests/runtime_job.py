"""What the runtime tests run on every rank: under `mpirun -np N python tests/runtime_job.py SPEC`,
and in-process (world 1) through `collect`.

SPEC (JSON): {"engines": {name: dir}, "prompts": [[ids]], "steps": n, "out": dir,
              "prefill_chunk": n | null,
              "kill": {"rank": r, "after_steps": k, "how": "kill" | "hang"} | null}
For each engine, in order, rank 0 stores score logits, greedy tokens and per-step decode
logits in OUT/<name>.pt - of the batch, of one prompt alone, and of prompts sharing a long
prefix sent one after another (the later ones reuse the first one's cached KV blocks);
the other ranks follow in worker_loop. "kill" makes rank r
SIGKILL itself, or hang forever, in the middle of a run (the no-hang tests).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from kimi_trt.runtime.engine import load_engine
from kimi_trt.runtime.sampling import SamplingParams
from kimi_trt.runtime.scheduling import KV_BLOCK_SIZE, Scheduling

# two and a half KV blocks shared by the prefix prompts (ids < 250: every tested vocab)
SHARED_PREFIX = [(7 * i + 3) % 241 for i in range(KV_BLOCK_SIZE * 5 // 2)]


def collect(engine, prompts: list[list[int]], steps: int) -> dict:
    """Rank 0: everything the parity tests compare (logits of prefill and of every decode step)."""
    greedy = SamplingParams(max_new_tokens=steps, stop_token_ids=(), return_logits=True)
    batch = engine.generate(prompts, greedy)
    single = engine.generate(prompts[:1], greedy)[0]
    prefixed = [engine.generate([SHARED_PREFIX + p], greedy)[0] for p in prompts]
    return {
        "score": engine.score(prompts),
        "tokens": [r.tokens for r in batch],
        "decode_logits": [torch.stack(r.logits) for r in batch],
        "single_tokens": single.tokens,
        "single_logits": torch.stack(single.logits),
        "prefix_tokens": [r.tokens for r in prefixed],
        "prefix_logits": [torch.stack(r.logits) for r in prefixed],
        "prefix_cached": [r.cached_tokens for r in prefixed],
    }


def _fail_after(steps: int, how: str) -> None:
    from kimi_trt.runtime.executor import TorchExecutor

    original = TorchExecutor.step
    calls = {"n": 0}

    def step(self, plan):
        calls["n"] += 1
        if calls["n"] > steps:
            if how == "hang":
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, plan)

    TorchExecutor.step = step


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    kill = spec.get("kill")
    if kill and kill["rank"] == rank:
        _fail_after(kill["after_steps"], kill.get("how", "kill"))
    out = Path(spec["out"])
    chunk = spec.get("prefill_chunk")
    scheduling = Scheduling(prefill_chunk=chunk) if chunk else None
    for name, engine_dir in spec["engines"].items():
        engine = load_engine(engine_dir, scheduling=scheduling)
        if engine.is_driver:
            torch.save(collect(engine, spec["prompts"], spec["steps"]), out / f"{name}.pt")
            engine.shutdown()
        else:
            engine.worker_loop()
        del engine
    return 0


if __name__ == "__main__":
    from kimi_trt.runtime.failure import run_rank
    from kimi_trt.runtime.launch import detect_rank_info

    info = detect_rank_info()
    sys.exit(run_rank(lambda: main(sys.argv[1]), info.rank, info.world_size))
