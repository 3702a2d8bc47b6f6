#!/usr/bin/env bash
# The main job on the built-in tiny model: set up, then run every stage that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=out/demo  # the paths build_configs/tiny_cpu_ep2.yaml names (relative to that file)
mkdir -p "$out"
kimi-trt synth --preset tiny --seed 0 --out "$out/hf-tiny" --quiet
kimi-trt inspect "$out/hf-tiny"
# plan -> convert -> compile -> package (torch backend: CPU, 2 ranks, EP2); a rerun skips
# every stage whose outputs still verify.
kimi-trt build --config build_configs/tiny_cpu_ep2.yaml
kimi-trt inspect "$out/engine-tiny-ep2"
# One process per rank; root may run Open MPI only with these two variables.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun -np 2 --oversubscribe kimi-trt run --engine-dir "$out/engine-tiny-ep2" \
    --prompt "The weather in Paris" --max-new-tokens 16
