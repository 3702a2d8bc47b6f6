"""Triton kernel for noaux_tc routing (semantics: `kimi_trt.plugins.routing`).

One program routes BLOCK_T tokens. The logits of a token are held as a [groups, group
size] tile (padded to powers of two), so group scoring and expert selection are register
reductions with no sort: each of the k picks is a max-reduction of the scores followed by
a min-reduction of the positions holding that max, which is the module's tie-breaking
rule (lowest id wins) by construction. Scores are clamped to >= -FLT_MAX (NaN included),
so -inf marks padding, experts of dropped groups and experts already picked, and every
pick lands on a real, not yet picked expert: ids are distinct and in range for any input.

Two ways to run it:
  * `route_triton`: JIT launch on CUDA tensors (the torch executor), or on CPU tensors
    under the Triton interpreter (`TRITON_INTERPRET=1` set before this module is
    imported), which is how CI proves it equal to the torch reference.
  * `compile_ptx`: ahead-of-time compilation to PTX whose entry takes exactly
    (logits, bias, num_tokens, ids, scales), the argument order TensorRT's AOT plugins
    use (inputs, extra int32 scalars, outputs). Works without a GPU given a target
    capability. Used by `trt_plugin`.

Only torch and triton are imported (the GPU check runs this from a bare checkout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kimi_trt.plugins.routing import RouterParams, check_logits_dtype, check_router_inputs

# Scores are clamped to >= -FLT_MAX (NaN too), so -inf is free to mark "not a candidate".
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _sigmoid(x, ACCURATE: tl.constexpr):
    # IEEE division and libdevice's expf: the same arithmetic as torch's CUDA sigmoid.
    # The interpreter has no libdevice, so it uses tl.exp (numpy's exp).
    if ACCURATE:
        e = libdevice.exp(-x)
    else:
        e = tl.exp(-x)
    return tl.math.div_rn(1.0, 1.0 + e)


@triton.jit
def _argmax_lowest(values, index, axis: tl.constexpr, NONE: tl.constexpr):
    """(max over `axis`, lowest `index` attaining it); NONE when no value equals the max."""
    best = tl.max(values, axis=axis)
    at = tl.min(tl.where(values == tl.expand_dims(best, axis), index, NONE), axis=axis)
    return best, at


@triton.jit
def _keep_best_groups(c, col, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr):
    """Step 2: keep the TOPK_GROUP groups with the largest top-2 sums; -inf the rest."""
    first, at = _argmax_lowest(c, col, 2, 1 << 20)
    second = tl.max(tl.where(col == at[:, :, None], float("-inf"), c), axis=2)
    score = first + second
    group = tl.arange(0, G_PAD)[None, :]
    score = tl.where(score > -FLT_MAX, score, -FLT_MAX)  # an overflowed sum stays a candidate
    score = tl.where(group < N_GROUP, score, float("-inf"))
    keep = score != score  # all False, [BLOCK_T, G_PAD]
    for _ in tl.static_range(TOPK_GROUP):
        _, best = _argmax_lowest(score, group, 1, G_PAD)
        hit = group == best[:, None]
        keep = keep | hit
        score = tl.where(hit, float("-inf"), score)
    return tl.where(keep[:, :, None], c, float("-inf"))


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every T, as in the AOT PTX
def noaux_tc_router_kernel(
    logits_ptr,
    bias_ptr,
    num_tokens,
    ids_ptr,
    scales_ptr,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCALE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    G_PAD: tl.constexpr,
    GS_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    ACCURATE: tl.constexpr,
):
    GROUP_SIZE: tl.constexpr = NUM_EXPERTS // N_GROUP
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok3 = tok[:, None, None]
    grp3 = tl.arange(0, G_PAD)[None, :, None]
    col3 = tl.arange(0, GS_PAD)[None, None, :]
    expert = grp3 * GROUP_SIZE + col3
    real = (grp3 < N_GROUP) & (col3 < GROUP_SIZE)
    row = tok.to(tl.int64) * NUM_EXPERTS
    live = tok < num_tokens
    x = tl.load(
        logits_ptr + row[:, None, None] + expert, mask=(tok3 < num_tokens) & real, other=0.0
    )
    c = _sigmoid(x.to(tl.float32), ACCURATE) + tl.load(bias_ptr + expert, mask=real, other=0.0)
    c = tl.where(c > -FLT_MAX, c, -FLT_MAX)  # NaN and -inf: the lowest real score
    c = tl.where(real, c, float("-inf"))
    if TOPK_GROUP < N_GROUP:
        c = _keep_best_groups(c, col3, N_GROUP, TOPK_GROUP, G_PAD)
    c = tl.reshape(c, [BLOCK_T, G_PAD * GS_PAD])
    pos = tl.arange(0, G_PAD * GS_PAD)[
        None, :
    ]  # expert = pos // GS_PAD * GROUP_SIZE + pos % GS_PAD

    slot = tl.arange(0, K_PAD)[None, :]
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        _, at = _argmax_lowest(c, pos, 1, G_PAD * GS_PAD)
        c = tl.where(pos == at[:, None], float("-inf"), c)
        ids = tl.where(slot == k, at[:, None], ids)
    ids = ids // GS_PAD * GROUP_SIZE + ids % GS_PAD
    # Weights: s of the winners, recomputed from their logits (same instructions, same bits).
    out_mask = live[:, None] & (slot < TOP_K)
    xw = tl.load(logits_ptr + row[:, None] + ids, mask=out_mask, other=0.0)
    weights = tl.where(slot < TOP_K, _sigmoid(xw.to(tl.float32), ACCURATE), 0.0)
    if NORMALIZE:
        total = tl.sum(weights, axis=1) + 1e-20  # routing.NORM_EPS
        weights = tl.math.div_rn(weights, total[:, None])  # IEEE, like torch
    weights = weights * SCALE
    out = tok[:, None].to(tl.int64) * TOP_K + slot
    tl.store(ids_ptr + out, ids, mask=out_mask)
    tl.store(scales_ptr + out, weights, mask=out_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tokens per program and warps per program (bench/routing_gpu.py sweeps several).

    Default: one warp for two tokens. Each token's reductions then stay inside a warp (no
    shared-memory barriers); in sm_90a SASS it has the fewest instructions per token of
    the barrier-free configurations at E = 384 (1208 vs 1480 for one token per warp).
    """

    block_t: int = 2
    num_warps: int = 1


DEFAULT_LAUNCH = LaunchConfig()


def is_interpreted() -> bool:
    """True when this module's kernel was built for the Triton interpreter."""
    return not isinstance(noaux_tc_router_kernel, triton.runtime.jit.JITFunction)


def kernel_constexprs(num_experts: int, params: RouterParams, block_t: int, accurate: bool) -> dict:
    """Compile-time arguments shared by the JIT launch and the AOT compile."""
    group_size = num_experts // params.n_group
    return {
        "NUM_EXPERTS": num_experts,
        "TOP_K": params.top_k,
        "N_GROUP": params.n_group,
        "TOPK_GROUP": params.topk_group,
        "SCALE": float(params.routed_scaling_factor),
        "NORMALIZE": bool(params.norm_topk_prob),
        "BLOCK_T": block_t,
        "G_PAD": triton.next_power_of_2(params.n_group),
        "GS_PAD": triton.next_power_of_2(group_size),
        "K_PAD": triton.next_power_of_2(params.top_k),
        "ACCURATE": accurate,
    }


def route_triton(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route with the Triton kernel: same contract as `routing.route_noaux_tc`."""
    params = RouterParams(top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    num_tokens, num_experts = check_router_inputs(logits, bias, **params.kwargs())
    logits, bias = logits.contiguous(), bias.contiguous()
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    scales = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return ids, scales
    grid = (triton.cdiv(num_tokens, launch.block_t),)
    consts = kernel_constexprs(num_experts, params, launch.block_t, not is_interpreted())
    noaux_tc_router_kernel[grid](
        logits,
        bias,
        num_tokens,
        ids,
        scales,
        **consts,
        num_warps=launch.num_warps,
        enable_fp_fusion=False,
    )
    return ids, scales


# ----------------------------------------------------------------------------- AOT


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel as TensorRT's AOT plugin interface wants it."""

    name: str
    ptx: str
    block_x: int  # threads per block (num_warps * 32)
    shared_mem: int
    block_t: int  # tokens per block: grid = ceil(T / block_t)


AOT_PARAMS = ("logits_ptr", "bias_ptr", "num_tokens", "ids_ptr", "scales_ptr")
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def compile_ptx(
    logits_dtype: torch.dtype,
    num_experts: int,
    params: RouterParams,
    *,
    capability: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
    ptx_version: int | None = None,
) -> AotKernel:
    """Compile the kernel to PTX for TensorRT (no GPU needed when `capability` is given).

    capability: e.g. 90 for H100/H200, 100 for B200; None = the current GPU's.
    ptx_version: PTX ISA of the output (None: 8.4 for Hopper, 8.7 for Blackwell). The
    engine's host driver JIT-compiles the PTX and must know this ISA version, so the
    default is older than what Triton would emit for its own bundled toolchain.
    """
    params.check(num_experts)
    if is_interpreted():
        raise RuntimeError("router: compile_ptx needs the compiled kernel; unset TRITON_INTERPRET")
    check_logits_dtype(logits_dtype)
    consts = kernel_constexprs(num_experts, params, launch.block_t, accurate=True)
    signature = {
        "logits_ptr": f"*{_TRITON_DTYPES[logits_dtype]}",
        "bias_ptr": "*fp32",
        "num_tokens": "i32",
        "ids_ptr": "*i32",
        "scales_ptr": "*fp32",
        **{name: "constexpr" for name in consts},
    }
    # TensorRT allocates device buffers 256-byte aligned: let loads/stores vectorise.
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4)}
    src = triton.compiler.ASTSource(
        fn=noaux_tc_router_kernel, signature=signature, constexprs=consts, attrs=aligned
    )
    if capability is None:
        target = triton.runtime.driver.active.get_current_target()
    else:
        target = triton.backends.compiler.GPUTarget("cuda", capability, 32)
    if ptx_version is None:
        ptx_version = 87 if int(target.arch) >= 100 else 84
    options = {"num_warps": launch.num_warps, "enable_fp_fusion": False, "ptx_version": ptx_version}
    compiled = triton.compile(src, target=target, options=options)
    meta = compiled.metadata
    ptx = drop_unused_trailing_params(compiled.asm["ptx"], meta.name, len(AOT_PARAMS))
    if meta.global_scratch_size or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"router: kernel {meta.name} needs Triton scratch memory (unsupported)")
    return AotKernel(meta.name, ptx, meta.num_warps * 32, meta.shared, launch.block_t)


_ENTRY = re.compile(r"(\.entry\s+(?P<name>\w+)\s*\()(?P<params>[^)]*)(\))", re.S)


def drop_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Cut a PTX entry's parameter list to its first `keep` parameters.

    Triton >= 3.3 appends scratch-memory pointers to every kernel; TensorRT's AOT
    launcher passes only (inputs, extra args, outputs), and a kernel declaring more
    parameters than it is given would read past the launcher's argument array. The cut
    is refused unless the dropped parameters are never referenced in the body.
    """
    match = _ENTRY.search(ptx)
    if match is None or match.group("name") != name:
        raise RuntimeError(f"router: no .entry {name} in the compiled PTX")
    params = _declared_params(match)
    if len(params) < keep:
        raise RuntimeError(f"router: PTX entry {name} has {len(params)} params, expected {keep}")
    body = ptx[match.end() :]
    for dropped in params[keep:]:
        pname = dropped.split()[-1]
        if re.search(rf"\b{re.escape(pname)}\b", body):
            raise RuntimeError(f"router: PTX parameter {pname} is used; cannot drop it")
    new_params = ",\n\t".join(params[:keep])
    return ptx[: match.start("params")] + "\n\t" + new_params + "\n" + ptx[match.end("params") :]


def ptx_entry_params(ptx: str) -> list[str]:
    """The declared parameters of the (single) PTX entry, e.g. '.param .u32 k_param_2'."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise RuntimeError("router: no .entry in PTX")
    return _declared_params(match)


def _declared_params(entry: re.Match) -> list[str]:
    return [p.strip() for p in entry.group("params").split(",") if p.strip()]
