#!/usr/bin/env python3
"""Entry point of the tiny model's prepare/train/score/export steps (kimi_trt.tinymodel.cli).

Runs from a bare checkout too (the train step on a GPU host needs only torch,
transformers, numpy and safetensors): the repository root is put on sys.path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kimi_trt.tinymodel.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
