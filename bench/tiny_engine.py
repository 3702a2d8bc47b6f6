"""The engine dir the serving benchmarks run: the synthetic tiny model converted at world 1,
with its tokenizer (shared by bench/serve.py and bench/serve_body.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from kimi_trt.config import Parallelism, WeightFormats
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint


def make_engine(work: Path) -> Path:
    hf, engine = work / "hf", work / "engine"
    write_synthetic_checkpoint(preset_config("tiny"), hf, seed=0, progress=False)
    run_conversion(hf, engine, Parallelism(tp=1), WeightFormats(), progress=False)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copyfile(hf / name, engine / name)
    return engine
