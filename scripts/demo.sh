#!/usr/bin/env bash
# The main job on the built-in tiny model: set up, then run every stage that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=${DEMO_DIR:-out/demo}
mkdir -p "$out"
kimi-trt synth --preset tiny --seed 0 --out "$out/hf-tiny" --quiet
kimi-trt inspect "$out/hf-tiny"
