#!/usr/bin/env bash
# GPU check of the expert-routing plugin (issue 5), one prepared run (< 5 min on one H200):
# CUDA correctness of the Triton kernel vs the torch reference, the AOT PTX launched with
# TensorRT's argument order, and timings (T = 1, 128, 4096, 16384; E = 384; k = 8) against
# the eager reference and the bandwidth bound. Writes $OUT/routing_gpu.json when OUT is
# set, else bench/results/routing_gpu.json. Needs python3 with CUDA torch + triton only
# (PYTHON=... to choose another interpreter); the package need not be installed.
# Extra arguments go to bench/routing_gpu.py (e.g. --no-sweep, --tokens 1 4096).
# Exit: 0 ok, 1 a correctness check failed, 3 no CUDA device, 124 timed out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=0 PYTHONUNBUFFERED=1

echo "gpu_check: $(date -u +%FT%TZ) repo=$PWD python=$("$PY" -c 'import sys; print(sys.version.split()[0])')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch, triton; print(f"gpu_check: torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, cuda available: {torch.cuda.is_available()}")'

limit="${GPU_CHECK_TIMEOUT:-290}"
if command -v timeout >/dev/null; then
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" bench/routing_gpu.py "$@"
else
    "$PY" bench/routing_gpu.py "$@"
fi
