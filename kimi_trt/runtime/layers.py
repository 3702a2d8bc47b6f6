"""The per-layer math of Kimi-K2 on one rank's shard, written against the per-rank tensors.

Every function takes this rank's tensors exactly as docs/per-rank-checkpoint.md lays them
out (fused_a rows q_a | c | k_pe, or c | k_pe without q LoRA; fused_q_proj per head
[absorbed q_nope ; q_pe]; kv_b_proj per head [k_nope ; v]; expert fc rows up | gate) and
returns this rank's *partial* result where the layout splits a reduction over ranks; the
caller (executor) owns the collectives. Math is in the tensors' dtype except norms,
softmax and the router, which run in float32 as transformers' DeepseekV3 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (transformers' order of operations)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rope:
    """YaRN rotary tables for interleaved pairs (x0, x1), (x2, x3), ... of the rope dims."""

    def __init__(self, inv_freq: list[float], attention_factor: float, max_len: int, dtype, device):
        inv = torch.tensor(inv_freq, dtype=torch.float32, device=device)
        angles = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * inv[None]
        self.cos = (angles.cos() * attention_factor).to(dtype)
        self.sin = (angles.sin() * attention_factor).to(dtype)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, ..., rope] where row i sits at positions[i]; pairs stay interleaved."""
        shape = [positions.shape[0]] + [1] * (x.dim() - 2) + [-1]
        cos = self.cos[positions].view(shape)
        sin = self.sin[positions].view(shape)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


@dataclass
class AttentionWeights:
    """One layer's MLA tensors on this rank (dequantised)."""

    fused_a: torch.Tensor  # [ql + kl + rope, H] (ql = 0 without q LoRA)
    q_a_norm: torch.Tensor | None  # [ql]; None without q LoRA
    kv_a_norm: torch.Tensor  # [kl]
    q_b: torch.Tensor  # [hl*(nope+rope), ql]: q_b_proj, or q_proj [hl*(nope+rope), H]
    kv_b: torch.Tensor  # [hl*(nope+vd), kl]
    fused_q: torch.Tensor  # [hl*(kl+rope), ql]
    dense: torch.Tensor  # [H, hl*vd]


@dataclass(frozen=True)
class MlaDims:
    heads: int  # local heads
    q_lora: int  # 0 without q LoRA (q_proj reads the hidden state directly)
    kv_lora: int
    nope: int
    rope: int
    v: int
    scale: float
    eps: float


def mla_latent(
    x: torch.Tensor, w: AttentionWeights, d: MlaDims, rope: Rope, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_a projection: (q input cq, cache rows [N, kl + rope] = c | RoPE(k_pe)).

    cq is the normed q latent [N, ql], or without q LoRA the hidden state x itself (the
    input of q_proj)."""
    a = x @ w.fused_a.T
    cq = x if w.q_a_norm is None else rms_norm(a[:, : d.q_lora], w.q_a_norm, d.eps)
    c = rms_norm(a[:, d.q_lora : d.q_lora + d.kv_lora], w.kv_a_norm, d.eps)
    k_pe = rope(a[:, d.q_lora + d.kv_lora :], positions)
    return cq, torch.cat((c, k_pe), dim=-1)


def _q_heads(cq: torch.Tensor, w: AttentionWeights, d: MlaDims, rope: Rope, positions):
    """Unabsorbed per-head queries [N, hl, nope + rope] (q_b_proj, RoPE on the rope dims)."""
    q = (cq @ w.q_b.T).view(cq.shape[0], d.heads, d.nope + d.rope)
    return torch.cat((q[..., : d.nope], rope(q[..., d.nope :], positions)), dim=-1)


def _kv_heads(latent: torch.Tensor, w: AttentionWeights, d: MlaDims):
    """Per-head keys [L, hl, nope + rope] and values [L, hl, vd] from latent rows (kv_b_proj;
    the rotated k_pe is shared by every head)."""
    n = latent.shape[0]
    kv = (latent[:, : d.kv_lora] @ w.kv_b.T).view(n, d.heads, d.nope + d.v)
    k_pe = latent[:, None, d.kv_lora :].expand(n, d.heads, d.rope)
    return torch.cat((kv[..., : d.nope], k_pe), dim=-1), kv[..., d.nope :]


def mla_prefill(
    cq: torch.Tensor,
    latent: torch.Tensor,
    w: AttentionWeights,
    d: MlaDims,
    rope: Rope,
    positions: torch.Tensor,
    seq_lens: list[int],
) -> torch.Tensor:
    """Unabsorbed causal attention over packed whole sequences (q_b_proj, kv_b_proj).

    cq [N, ql] and latent [N, kl + rope] are the packed tokens of sequences of `seq_lens`
    (each starting at position 0). Returns attention outputs before `dense`: [N, hl*vd].
    """
    q = _q_heads(cq, w, d, rope, positions)
    k, v = _kv_heads(latent, w, d)
    outs = []
    start = 0
    for length in seq_lens:
        sl = slice(start, start + length)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1),
            k[sl].transpose(0, 1),
            v[sl].transpose(0, 1),
            is_causal=True,
            scale=d.scale,
        )
        outs.append(o.transpose(0, 1).reshape(length, d.heads * d.v))
        start += length
    return torch.cat(outs, dim=0)


def mla_extend(
    cq: torch.Tensor,
    ctx: torch.Tensor,
    w: AttentionWeights,
    d: MlaDims,
    rope: Rope,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Unabsorbed attention of T new prompt tokens of one sequence over its cached latents
    (a later prefill chunk, or the rest of a prompt after a prefix-cache hit).

    The cached rows are up-projected with kv_b_proj, as vLLM's MLA prefill does for its
    context, so a chunked or prefix-cached prompt gets the same math (and precision) as a
    prompt prefilled in one piece. cq [T, ql]; ctx [L, kl + rope] holding rows 0..p of the
    last new token (and possibly more); positions [T] ascending. Returns [T, hl*vd].
    """
    q = _q_heads(cq, w, d, rope, positions)
    length = int(positions[-1]) + 1
    k, v = _kv_heads(ctx[:length], w, d)
    visible = torch.arange(length, device=ctx.device)[None, :] <= positions[:, None]  # [T, L]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible, scale=d.scale
    )
    return o.transpose(0, 1).reshape(cq.shape[0], d.heads * d.v)


def mla_decode(
    cq: torch.Tensor,
    ctx: torch.Tensor,
    w: AttentionWeights,
    d: MlaDims,
    rope: Rope,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Absorbed attention of one new token per sequence over its latent cache (MQA over
    kl + rope), as TensorRT-LLM's MLA generation kernels do.

    cq [B, ql]; ctx [B, L, kl + rope], each sequence's cached rows, already holding the new
    token's; positions [B]: the token at p sees rows 0..p. Returns [B, hl*vd].
    """
    b = cq.shape[0]
    qa = (cq @ w.fused_q.T).view(b, d.heads, d.kv_lora + d.rope)
    qa = torch.cat((qa[..., : d.kv_lora], rope(qa[..., d.kv_lora :], positions)), dim=-1)
    scores = torch.matmul(qa, ctx.transpose(1, 2)).to(torch.float32) * d.scale  # [B, hl, L]
    invalid = torch.arange(ctx.shape[1], device=ctx.device)[None, :] > positions[:, None]
    scores.masked_fill_(invalid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(ctx.dtype)
    o_lat = torch.matmul(p, ctx[..., : d.kv_lora])  # [B, hl, kl]
    w_v = w.kv_b.view(d.heads, d.nope + d.v, d.kv_lora)[:, d.nope :]  # [hl, vd, kl]
    out = torch.einsum("bhk,hvk->bhv", o_lat, w_v)
    return out.reshape(b, d.heads * d.v)


def swiglu(x: torch.Tensor, up_gate: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down @ (silu(gate x) * (up x)) with `up_gate` rows = up | gate (expert / shared fc)."""
    h = x @ up_gate.T
    half = h.shape[-1] // 2
    return (F.silu(h[..., half:]) * h[..., :half]) @ down.T


def dense_mlp(
    x: torch.Tensor, fc: torch.Tensor, gate: torch.Tensor, proj: torch.Tensor
) -> torch.Tensor:
    """Dense SwiGLU with TensorRT-LLM names: fc = activated (gate_proj), gate = up_proj."""
    return (F.silu(x @ fc.T) * (x @ gate.T)) @ proj.T


def routed_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    fc: torch.Tensor,
    proj: torch.Tensor,
    first_expert: int,
) -> torch.Tensor:
    """Sum over this rank's experts [first, first + El) of w * expert(x) for the tokens routed there.

    x [M, H], ids/weights [M, k] with global expert ids. Tokens are grouped per expert with
    one sort, so the loop runs once per expert that received tokens.
    """
    out = torch.zeros_like(x)
    local = ids.to(torch.int64) - first_expert
    flat = local.flatten()
    mine = (flat >= 0) & (flat < fc.shape[0])
    if not bool(mine.any()):
        return out
    slots = mine.nonzero().squeeze(1)
    order = torch.argsort(flat[slots], stable=True)
    slots = slots[order]
    experts = flat[slots]
    tokens = slots // ids.shape[1]
    scales = weights.flatten()[slots].to(x.dtype)
    counts = torch.bincount(experts, minlength=fc.shape[0]).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        idx = tokens[start : start + count]
        y = swiglu(x[idx], fc[e], proj[e]) * scales[start : start + count, None]
        out.index_add_(0, idx, y)
        start += count
    return out
