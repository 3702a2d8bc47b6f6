#!/usr/bin/env bash
# Train the tiny tool-calling model on the device machine (one GPU), for the lead.
#
# Needs the prepared data carried in .gpu_carry/tiny-kimi-data (made here on CPU with
# `scripts/train_tiny_model.py prepare --out .gpu_carry/tiny-kimi-data`) and only torch,
# transformers, numpy and safetensors on the machine. Writes into $OUT (default ./out-gpu):
# weights-*.safetensors (bf16, each < 16 MiB), train_log.json and train.log.
#
#   bash scripts/gpu_train.sh [MINUTES]        # whole run, setup and final save included
#
# The run stops by itself inside MINUTES (and saves on SIGTERM); weights are also saved
# after every periodic eval, so a hard kill still leaves the last minute's model.
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-8}"
OUT="${OUT:-out-gpu}"
DATA="${DATA:-.gpu_carry/tiny-kimi-data}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ ! -f "$DATA/corpus.npz" ]; then
    echo "error: $DATA/corpus.npz missing (carry .gpu_carry)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
"$PY" -u scripts/train_tiny_model.py train --data "$DATA" --out "$OUT" --minutes "$MINUTES" \
    "${@:2}" 2>&1 | tee "$OUT/train.log" | grep -v -i warning
exit "${PIPESTATUS[0]}"
