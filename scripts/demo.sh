#!/usr/bin/env bash
# The main job on the built-in tiny model (kimi_trt/assets/tiny-kimi, a Kimi-K2-architecture
# model trained to call tools; docs/tiny-model.md): set up, build its engine dir on this CPU
# (plan -> convert -> compile -> package, torch backend, 2 ranks with experts by EP2), then
# chat with it under mpirun: the Kimi tool call is parsed, the tool runs, the model answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
kimi-trt inspect kimi_trt/assets/tiny-kimi
# A rerun skips every stage whose outputs still verify (checksums + config hash).
kimi-trt build --config build_configs/tiny_cpu_ep2.yaml
kimi-trt inspect out/demo/engine-tiny-ep2
# One process per rank; as root Open MPI needs these two variables. PASSIVE keeps idle
# OpenMP threads from spinning when ranks share few cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
mpirun -np 2 --oversubscribe python scripts/demo_chat.py --engine-dir out/demo/engine-tiny-ep2
