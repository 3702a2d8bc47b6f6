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
