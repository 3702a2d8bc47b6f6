#!/usr/bin/env bash
# Creates .venv and installs kimi_trt with every extra that runs on a CPU machine.
# torch is installed first and pinned: an unpinned requirement can pull a multi-GB CUDA
# build, while torch==2.13.0 resolves to a CPU wheel on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,mpi,serve,kernels]"
echo "kimi_trt installed in .venv ($(.venv/bin/python -c 'import torch;print("torch", torch.__version__)'))"
