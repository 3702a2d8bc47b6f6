"""The routing GPU check (scripts/gpu_check.sh -> bench/routing_gpu.py) is ready to run.

CI has no GPU: this runs the script's CPU part (kernel vs reference in the Triton
interpreter, JSON report) in a fresh process, checks that it imports nothing the device
machine lacks (the package is not installed there: only torch and triton are), and that
the shell wrapper parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_RUN = """
import json, runpy, sys
sys.argv = ["bench/routing_gpu.py", "--cpu-smoke", "--out", sys.argv[1]]
try:
    runpy.run_path("bench/routing_gpu.py", run_name="__main__")
    rc = 0
except SystemExit as exc:
    rc = exc.code
absent_on_device = ("click", "pydantic", "yaml", "jinja2", "tiktoken")  # project deps, not torch's
print(json.dumps({"rc": rc, "imported": [m for m in absent_on_device if m in sys.modules]}))
"""


def test_cpu_part_of_the_gpu_check(tmp_path):
    out = tmp_path / "routing_gpu.json"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == {"rc": 0, "imported": []}
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["device"] == "cpu"
    cases = report["correctness"]
    assert len(cases) >= 50 and report["correctness_failures"] == 0
    assert all(c["exact"] for c in cases)
    names = {c["case"] for c in cases}
    assert {"kimi-k2/random", "deepseek-v3/inf-mix", "limits/bias-swamps-scores"} <= names


def test_gpu_check_script_parses_and_is_executable():
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    assert "set -euo pipefail" in text and "bench/routing_gpu.py" in text
