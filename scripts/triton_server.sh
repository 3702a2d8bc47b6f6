#!/usr/bin/env bash
# Start the tritonserver bundled with nvidia-pytriton on 127.0.0.1 for an engine dir:
# writes (or reuses) the model repository, then runs it in the foreground.
#   scripts/triton_server.sh ENGINE_DIR [REPO_DIR] [extra `kimi-trt triton-server` options]
# Multi-rank engine dirs start in leader mode (mpirun, one process per rank, rank 0 serves).
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${1:?usage: scripts/triton_server.sh ENGINE_DIR [REPO_DIR] [options]}"
repo="${2:-$engine/triton_repo}"
shift $(( $# >= 2 ? 2 : 1 ))
if [ ! -d "$repo" ]; then
    .venv/bin/kimi-trt triton-repo --engine-dir "$engine" --out "$repo"
fi
exec .venv/bin/kimi-trt triton-server --model-repository "$repo" "$@"
