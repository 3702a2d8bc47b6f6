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
out = sys.argv[1]
sys.argv = ["bench/routing_gpu.py", "--cpu-smoke"]  # read at import: selects the interpreter
bench = runpy.run_path("bench/routing_gpu.py", run_name="routing_gpu")
rc = bench["main"](["--cpu-smoke", "--out", out])
# The GPU-only report helpers, on rows shaped like timings() makes (one timer failed):
rows = []
for tokens, kernel in ((1, None), (4096, 6.0), (16384, 20.0)):
    row = {"tokens": tokens, "experts": 384, "top_k": 8, "dtype": "torch.bfloat16"}
    row.update(kernel_us=kernel, kernel_eager_call_us=30.0, reference_us=80.0)
    row.update(reference_eager_call_us=None, bound_us=bench["bound_us"](tokens, 384, 8, 2))
    k = kernel or 30.0
    row.update(speedup_vs_reference=80.0 / k, kernel_over_bound=k / row["bound_us"])
    rows.append(row)
lines = [bench["_fmt_timing"](r) for r in rows]
targets = bench["_targets"](rows)
absent_on_device = ("click", "pydantic", "yaml", "jinja2", "tiktoken")  # project deps, not torch's
imported = [m for m in absent_on_device if m in sys.modules]
print(json.dumps({"rc": rc, "imported": imported, "lines": lines, "targets": targets}))
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
    assert status["rc"] == 0 and status["imported"] == []
    assert len(status["lines"]) == 3 and "n/a" in status["lines"][0]
    bf16 = status["targets"]["torch.bfloat16"]
    # bf16 bounds are the 5 us floor here (16384 * 384 * 2 B / 4.3 TB/s = 2.9 us)
    assert bf16["speedup_target_5x_met"] is True  # 80 / 6 = 13x at T = 4096
    assert bf16["bound_target_3x_met_at_4096"] is True  # 6 / 5
    assert bf16["bound_target_3x_met_all_tokens"] is False  # T = 16384: 20 / 5

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
