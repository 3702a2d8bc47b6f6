#!/usr/bin/env python3
"""Evaluate the tiny tool-calling model (kimi_trt.tinymodel.evaluate; `--help` explains).

.venv/bin/python scripts/eval_tiny_model.py                      # convert + mpirun, TP4
.venv/bin/python scripts/eval_tiny_model.py --backend hf --limit 60
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kimi_trt.tinymodel.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
