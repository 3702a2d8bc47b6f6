"""Block-FP8 fusions and splits whose boundaries are not on the 128-row block grid.

`moe_intermediate_size` 96 fuses up (rows 0-95) and gate (rows 96-191) of each expert into
one matrix whose first 128-row scale block straddles both: concatenating the two tensors'
FP8 bytes and scale rows would decode gate rows 0-31 with up_proj's scale. Every written
tensor, decoded with the target's own block grid, must equal its source within what the
manifest states.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_trt.config import Parallelism, WeightFormats
from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint
from tests.convert_support import convert_and_check


@pytest.fixture(scope="module")
def straddle_ckpt(tmp_path_factory) -> Path:
    """tiny with moe_intermediate_size 96: up|gate (experts, shared expert) straddle a block."""
    out = tmp_path_factory.mktemp("straddle")
    cfg = preset_config("tiny", overrides={"moe_intermediate_size": 96})
    write_synthetic_checkpoint(cfg, out, seed=5, progress=False)
    return out


def test_straddling_up_gate_manifest_matches_written_bytes(straddle_ckpt):
    """World 1, fp8_block: the manifest's claim (exact or max_rel_err) holds for every tensor."""
    convert_and_check(straddle_ckpt, Parallelism(), WeightFormats())
