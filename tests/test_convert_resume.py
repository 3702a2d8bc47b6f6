"""Resume: SIGKILL a converter subprocess mid-run, rerun, compare with an uninterrupted run.

The kill lands while rank 1 is being written (its .tmp exists, rank 0 is complete and
recorded). The rerun must reuse rank 0 (checksum verified), redo the rest, and leave
every file byte-identical to a conversion that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kimi_trt.convert.safetensors_io import sha256_file
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


def kill_while_writing_rank1(cmd: list[str], out: Path) -> None:
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = out / "rank1.safetensors.tmp"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, "converter finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_resume_is_byte_identical(tiny_groups_ckpt, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(convert_cmd(tiny_groups_ckpt, ref))
    kill_while_writing_rank1(convert_cmd(tiny_groups_ckpt, out), out)
    assert not (out / "manifest.json").exists()  # killed mid-run: not marked complete
    assert (out / "rank0.safetensors").exists()
    assert not (out / "rank3.safetensors").exists()

    resumed = run(convert_cmd(tiny_groups_ckpt, out))
    assert "reused" in resumed.stdout and "1 reused" in resumed.stdout, resumed.stdout
    assert not list(out.glob("*.tmp"))
    for name in FILES:
        assert sha256_file(out / name) == sha256_file(ref / name), name

    # A rank file damaged after the fact is detected by its checksum and rewritten.
    with open(out / "rank2.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    again = run(convert_cmd(tiny_groups_ckpt, out))
    assert "1 rank file(s) written, 3 reused" in again.stdout, again.stdout
    for name in FILES:
        assert sha256_file(out / name) == sha256_file(ref / name), name
