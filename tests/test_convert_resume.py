"""Resume: SIGKILL a converter subprocess mid-run, rerun, compare with an uninterrupted run.

The kill lands as soon as rank 0 is complete (ranks are written one after another with
--jobs 1), i.e. while a later rank is being written. The rerun must reuse rank 0 (checksum verified), redo the rest, and leave
every file byte-identical to a conversion that was never interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import cli_env

FILES = ["config.json", "manifest.json"] + [f"rank{r}.safetensors" for r in range(4)]


def convert_cmd(ckpt: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kimi_trt.cli",
        "convert",
        "--quiet",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--tp",
        "4",
        "--ep",
        "2",
        "--moe-tp",
        "2",
        "--format",
        "experts=int8_wo",
        "--jobs",
        "1",
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_after_first_rank(cmd: list[str], out: Path) -> None:
    """SIGKILL the converter as soon as rank 0 is complete and recorded in the resume
    state (ranks are written in order with --jobs 1)."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = out / ".convert-state.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, "converter finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def written_reused(stdout: str) -> tuple[int, int]:
    m = re.search(r"(\d+) rank file\(s\) written, (\d+) reused", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_sigkill_then_resume_is_byte_identical(tiny_groups_ckpt, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(convert_cmd(tiny_groups_ckpt, ref))
    kill_after_first_rank(convert_cmd(tiny_groups_ckpt, out), out)
    assert not (out / "manifest.json").exists()  # killed mid-run: not marked complete
    assert not all((out / f"rank{r}.safetensors").exists() for r in range(4))

    resumed = run(convert_cmd(tiny_groups_ckpt, out))
    written, reused = written_reused(resumed.stdout)
    assert written >= 1 and reused >= 1 and written + reused == 4
    assert not list(out.glob("*.tmp"))
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    # A rank file damaged after the fact is detected by its checksum and rewritten.
    with open(out / "rank2.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    again = run(convert_cmd(tiny_groups_ckpt, out))
    assert written_reused(again.stdout) == (1, 3)
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
