"""Helpers of the serving tests: a scripted tool-calling engine dir and server processes.

The engine is the synthetic tiny model with its embeddings/lm_head rewritten
(kimi_trt.testing.scripted_model) so that, after a chat prompt's generation prompt
(`<|im_middle|>`), greedy decoding writes "Check", a reserved special token, "ing." (so
returned text is "Checking." only if special tokens are left out of it) and one Kimi tool
call get_weather({"city": "Paris"}) and stops with <|im_end|>. Everything else it generates
is the random model's output. The expected tool call is known independently of the
serving code: it is the script.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.config import Parallelism, WeightFormats
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint
from kimi_trt.serving.triton_server import die_with_parent
from kimi_trt.testing.scripted_model import script_checkpoint, tool_call_script
from tests.runtime_support import free_port, mpi_env, mpirun

CONTENT = "Checking."
SCRIPTED_CONTENT = "Check<|reserved_token_1100|>ing."  # what the model writes
TOOL_NAME = "get_weather"
ARGUMENTS = '{"city": "Paris"}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")


def scripted_engine(root: Path, tp: int = 1) -> Path:
    """A torch-executor engine dir (per-rank checkpoint + tokenizer) of the scripted model."""
    hf = root / "hf-scripted"
    if not (hf / "config.json").is_file():
        write_synthetic_checkpoint(preset_config("tiny"), hf, seed=3, progress=False)
        tokenizer = KimiTokenizer.from_dir(hf)
        script = tool_call_script(tokenizer, SCRIPTED_CONTENT, TOOL_NAME, ARGUMENTS)
        script_checkpoint(hf, script)
    out = root / f"engine-scripted-tp{tp}"
    layout = {"tp": 1} if tp == 1 else {"tp": tp, "ep": 1, "moe_tp": tp}
    run_conversion(hf, out, Parallelism(**layout), WeightFormats(), progress=False, warn=print)
    for name in TOKENIZER_FILES:
        shutil.copyfile(hf / name, out / name)
    return out


def script_tokens(engine_dir: Path) -> list[int]:
    """The scripted continuation after `<|im_middle|>` (stop token excluded)."""
    tokenizer = KimiTokenizer.from_dir(engine_dir)
    return tool_call_script(tokenizer, SCRIPTED_CONTENT, TOOL_NAME, ARGUMENTS)[1:-1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def start_api_server(
    engine_dir: Path, log: Path, *extra: str, ranks: int = 1, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """Start `kimi-trt serve` on 127.0.0.1 (under mpirun when ranks > 1): (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "kimi_trt.cli", "serve", "--engine-dir", str(engine_dir)]
    cmd += ["--port", str(port), "--log-level", "warning", *extra]
    if ranks > 1:
        cmd = mpirun(ranks, *cmd)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env or mpi_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def api_server(engine_dir: Path, log: Path, *extra: str, ranks: int = 1, timeout: float = 120):
    """`kimi-trt serve` on 127.0.0.1 (under mpirun when ranks > 1); yields its base URL."""
    proc, base = start_api_server(engine_dir, log, *extra, ranks=ranks)
    try:
        wait_http(base + "/health", proc, timeout, log)
        yield base
    finally:
        stop_server(proc)


def metric(base: str, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
