"""A rank of `mpirun -np 2 kimi-trt serve` stopped (SIGSTOP) or killed (SIGKILL), while the
server is idle or mid-stream: the job must end - every rank gone, mpirun's exit status
non-zero - within the collective timeout + 10 s, the stream in flight must end with an
error instead of hanging, and `/health` must never answer ok once the loss is known.
The collective timeout is 5 s here (KIMI_TRT_COLLECTIVE_TIMEOUT)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.runtime_support import mpi_env
from tests.serving_support import scripted_engine, start_api_server, stop_server, wait_http

pytestmark = [pytest.mark.serving, pytest.mark.mpi]
COLLECTIVE_TIMEOUT_S = 5
DEADLINE_S = COLLECTIVE_TIMEOUT_S + 10


@pytest.fixture(scope="module")
def engine_tp2(tmp_path_factory):
    return scripted_engine(tmp_path_factory.mktemp("faults"), tp=2)


def _rank_pid(master_port: str, rank: int) -> int:
    """The pid of `rank` of the job whose MASTER_PORT is `master_port` (from /proc)."""
    want = {f"OMPI_COMM_WORLD_RANK={rank}".encode(), f"MASTER_PORT={master_port}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                return int(entry.name)
    raise AssertionError(f"no process of rank {rank} with MASTER_PORT={master_port}")


class _HealthWatch(threading.Thread):
    """Polls /health every 0.1 s until stopped; records (time, status or None)."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.seen, self.done = base, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = httpx.get(self.base + "/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            self.seen.append((time.monotonic(), status))
            time.sleep(0.1)


def _stream_events(base: str, lines: list[str], started: threading.Event) -> None:
    """A long streaming completion; its lines go to `lines` until the stream ends."""
    body = {"model": "kimi-k2", "prompt": "The", "max_tokens": 2000}  # greedy: no stop
    body |= {"stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()
    except httpx.HTTPError as e:
        lines.append(f"transport error: {e}")
    finally:
        started.set()


@pytest.mark.parametrize("when", ["idle", "mid-stream"])
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_lost_rank_ends_the_job(engine_tp2, tmp_path, sig, when):
    env = mpi_env()
    env["KIMI_TRT_COLLECTIVE_TIMEOUT"] = str(COLLECTIVE_TIMEOUT_S)
    log = tmp_path / "serve.log"
    proc, base = start_api_server(engine_tp2, log, ranks=2, env=env)
    rank1 = None
    try:
        wait_http(base + "/health", proc, 120, log)
        rank1 = _rank_pid(env["MASTER_PORT"], 1)
        lines: list[str] = []
        stream = None
        if when == "mid-stream":
            started = threading.Event()
            stream = threading.Thread(target=_stream_events, args=(base, lines, started))
            stream.start()
            assert started.wait(60) and any(line.startswith("data: ") for line in lines)
        watch = _HealthWatch(base)
        watch.start()
        signalled = time.monotonic()
        os.kill(rank1, sig)
        returncode = proc.wait(DEADLINE_S + 20)  # fails the test (TimeoutExpired) on a hang
        ended = time.monotonic() - signalled
        watch.done.set()
        if stream is not None:
            stream.join(10)
            assert not stream.is_alive()
    finally:
        if proc.poll() is None:
            stop_server(proc)
        if rank1 is not None:  # a stopped rank left behind would outlive the test
            for s in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(rank1, s)
                except ProcessLookupError:
                    break
    output = log.read_text()
    firsts = {}
    for t, st in watch.seen:
        firsts.setdefault(st, round(t - signalled, 1))
    print(f"{sig.name} {when}: job ended {ended:.1f} s after the signal, exit {returncode}", firsts)
    assert returncode != 0 and ended <= DEADLINE_S, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    statuses = [s for _, s in watch.seen]
    if 503 in statuses:  # once unhealthy, never ok again
        assert 200 not in statuses[statuses.index(503) :]
    if sig == signal.SIGSTOP:  # rank 0 found the stuck peer itself, and said so once
        assert output.count("lost contact with another rank") == 1, output[-3000:]
    if when == "mid-stream":
        events = [line[6:] for line in lines if line.startswith("data: ")]
        if events[-1] == "[DONE]":  # the server ended the stream with an error event
            assert "error" in json.loads(events[-2]), events[-3:]
        else:  # or the job went away under it (mpirun ended rank 0 first)
            assert lines[-1].startswith("transport error") or len(events) < 2000
