"""AOT compilation of the routing kernel to PTX, as the TensorRT plugin ships it.

No GPU is needed: Triton compiles for an explicit target capability. The compile runs in
a subprocess without TRITON_INTERPRET (an interpreted kernel cannot be compiled), and the
checks are on what TensorRT will launch: the entry's parameter list must be exactly
(logits, bias, num_tokens, ids, scales), the PTX ISA old enough for current drivers, and
the PTX must assemble with the CUDA toolkit's ptxas when one is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kimi_trt.plugins.routing_triton import (
    DEFAULT_LAUNCH,
    drop_unused_trailing_params,
    ptx_entry_params,
)

_COMPILE = """
import dataclasses, json, sys, torch
from kimi_trt.plugins.routing import RouterParams
from kimi_trt.plugins.routing_triton import compile_ptx
out = {
    "hopper_bf16": compile_ptx(torch.bfloat16, 384, RouterParams(8, 1, 1, 2.827, True), capability=90),
    "blackwell_fp32_groups": compile_ptx(torch.float32, 256, RouterParams(8, 8, 4, 2.5, True), capability=100),
}
json.dump({k: dataclasses.asdict(v) for k, v in out.items()}, sys.stdout)
"""


@pytest.fixture(scope="module")
def kernels() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_entry_has_exactly_the_tensorrt_parameters(kernels):
    kern = kernels["hopper_bf16"]
    types = [p.split()[1] for p in ptx_entry_params(kern["ptx"])]
    assert types == [".u64", ".u64", ".u32", ".u64", ".u64"]  # logits, bias, T, ids, scales
    assert ".version 8.4" in kern["ptx"] and ".target sm_90a" in kern["ptx"]
    assert kern["block_x"] == 32 * DEFAULT_LAUNCH.num_warps
    assert f".reqntid {kern['block_x']}" in kern["ptx"]
    assert kern["name"] == "noaux_tc_router_kernel"


def test_blackwell_target(kernels):
    kern = kernels["blackwell_fp32_groups"]
    assert len(ptx_entry_params(kern["ptx"])) == 5
    assert ".version 8.7" in kern["ptx"] and ".target sm_100a" in kern["ptx"]


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not on PATH")
@pytest.mark.parametrize(
    "name,arch", [("hopper_bf16", "sm_90a"), ("blackwell_fp32_groups", "sm_100a")]
)
def test_ptx_assembles(kernels, name, arch, tmp_path):
    ptx = tmp_path / "router.ptx"
    ptx.write_text(kernels[name]["ptx"])
    cubin = tmp_path / "router.cubin"
    proc = subprocess.run(
        ["ptxas", f"-arch={arch}", str(ptx), "-o", str(cubin)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert cubin.stat().st_size > 0


def test_dropping_a_used_parameter_is_refused():
    ptx = (
        ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n"
        "{\n\tld.param.b64 %rd1, [k_param_1];\n}\n"
    )
    with pytest.raises(RuntimeError, match="k_param_1 is used"):
        drop_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert ptx_entry_params(drop_unused_trailing_params(unused, "k", 1)) == [
        ".param .u64 k_param_0"
    ]
