#!/usr/bin/env bash
# GPU check of the expert-routing plugin (issue 5), one prepared run (< 5 min on one H200):
# CUDA correctness of the Triton kernel vs the torch reference, the AOT PTX launched with
# TensorRT's argument order, and timings (T = 1, 128, 4096, 16384; E = 384; k = 8) against
# the eager reference and the bandwidth bound. Writes $OUT/routing_gpu.json when OUT is
# set, else bench/results/routing_gpu.json. Needs python3 with CUDA torch + triton only
# (PYTHON=... to choose another interpreter); the package need not be installed.
# Extra arguments go to bench/routing_gpu.py (e.g. --no-sweep, --tokens 1 4096).
# Where tensorrt_llm imports, it then proves TensorRT-LLM's PyTorch backend runs our engine
# dirs: builds build_configs/tiny_gpu_llmapi.yaml (the shipped tiny model, one GPU) and runs
# `kimi-trt verify` on it against the shipped transformers references (needs the package
# installed: pip install -e '.[trtllm]'); skipped with a line saying so otherwise.
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
run_limited() {
    if command -v timeout >/dev/null; then
        timeout --signal=TERM --kill-after=10 "$limit" "$@"
    else
        "$@"
    fi
}
run_limited "$PY" bench/routing_gpu.py "$@"

if "$PY" -c 'import tensorrt_llm' >/dev/null 2>&1; then
    echo "gpu_check: tensorrt_llm $("$PY" -c 'import tensorrt_llm; print(tensorrt_llm.__version__)'): verifying the tiny model on TensorRT-LLM's PyTorch backend"
    "$PY" -m kimi_trt.cli build --config build_configs/tiny_gpu_llmapi.yaml
    run_limited "$PY" -m kimi_trt.cli verify --engine-dir out/gpu/engine-tiny-llmapi
else
    echo "gpu_check: tensorrt_llm not importable: TensorRT-LLM's PyTorch backend not verified (pip install 'kimi_trt[trtllm]' to include it)"
fi
