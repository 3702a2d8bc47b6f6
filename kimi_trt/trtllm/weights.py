"""Per-rank checkpoint tensors -> the names and layouts TensorRT-LLM's layers declare.

The converter writes one layout for every executor (docs/per-rank-checkpoint.md); the
TensorRT-LLM network declares a few tensors differently. This module bridges the two at
engine build time, tensor by tensor, in plain torch (tested on CPU):

- MLA (`tensorrt_llm/layers/attention.py`, `DeepseekV2Attention`): `q_b_proj`,
  `kv_b_proj`, `fused_q_proj` are bare Parameters (no `.weight` suffix), and `kv_b_proj`
  is `[k_nope of all local heads ; v of all local heads]` where the checkpoint keeps HF's
  per-head interleave (deviation 2 of the format doc). Versions that also declare
  `k_b_proj_trans` (`[hl*kl, nope]`) get it derived from `kv_b_proj`.
- Weight-only int8 (`tensorrt_llm/layers/moe.py` `MOEWeightWrapper`,
  `tensorrt_llm/quantization/layers.py` `WeightOnlyQuant*Linear`): weights are stored
  `[.., in, out]` in the kernel's interleaved layout and scales in the model dtype under
  `per_channel_scale`; the checkpoint stores row-major `[.., out, in]` int8 + fp32 scales.
  The interleave is architecture specific, so the caller passes TensorRT-LLM's
  `preprocess_weights_for_mixed_gemm` as `preprocess_int8`.

`load_rank_weights` reads a rank file for `model.py` (which needs tensorrt_llm, so the
check lives here where it is tested without it): header and tensor list are checked
before safetensors trusts a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kimi_trt.convert.rank_checkpoint import check_rank_header, read_rank_config
from kimi_trt.errors import CheckpointError

PreprocessInt8 = Callable[[torch.Tensor], torch.Tensor]
MLA_BARE = ("attention.q_b_proj", "attention.kv_b_proj")


@dataclass(frozen=True)
class MlaDims:
    """Per-rank MLA sizes: local heads, nope/rope/v head dims, kv latent rank."""

    heads: int
    nope: int
    v: int
    kv_lora: int


def kv_b_heads_split(w: torch.Tensor, d: MlaDims) -> tuple[torch.Tensor, torch.Tensor]:
    """HF per-head kv_b_proj [hl*(nope+v), kl] -> (k_nope [hl, nope, kl], v [hl, v, kl])."""
    expect = (d.heads * (d.nope + d.v), d.kv_lora)
    if tuple(w.shape) != expect:
        raise CheckpointError(f"kv_b_proj: shape {tuple(w.shape)}, expected {expect}")
    kv = w.view(d.heads, d.nope + d.v, d.kv_lora)
    return kv[:, : d.nope], kv[:, d.nope :]


def kv_b_trtllm(w: torch.Tensor, d: MlaDims) -> torch.Tensor:
    """TensorRT-LLM's kv_b_proj: all local heads' k_nope rows, then all their v rows."""
    k, v = kv_b_heads_split(w, d)
    return torch.cat([k.reshape(-1, d.kv_lora), v.reshape(-1, d.kv_lora)]).contiguous()


def k_b_proj_trans(w: torch.Tensor, d: MlaDims) -> torch.Tensor:
    """[hl*kl, nope]: per head, k_nope's projection transposed (latent -> nope)."""
    k, _ = kv_b_heads_split(w, d)
    return k.transpose(1, 2).reshape(d.heads * d.kv_lora, d.nope).contiguous()


def int8_weight_only(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, preprocess: PreprocessInt8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major int8 [.., out, in] + scales [.., out] -> kernel layout [.., in, out], scales in `dtype`."""
    if q.dtype != torch.int8 or tuple(scale.shape) != tuple(q.shape[:-1]):
        raise CheckpointError(
            f"int8_wo weight {tuple(q.shape)} {q.dtype} with scale {tuple(scale.shape)}: "
            "expected int8 [.., out, in] and [.., out]"
        )
    return preprocess(q.transpose(-1, -2).contiguous()), scale.to(dtype)


def _fit(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Reshape `t` to the declared parameter shape when only the view differs."""
    if shape is None or tuple(t.shape) == shape:
        return t
    if t.numel() != torch.Size(shape).numel():
        raise CheckpointError(
            f"{name}: checkpoint shape {tuple(t.shape)} does not fit the network's {shape}"
        )
    return t.reshape(shape)


def adapt_rank_weights(
    weights: dict[str, torch.Tensor],
    required: dict[str, tuple[int, ...]],
    mla: MlaDims,
    dtype: torch.dtype,
    preprocess_int8: PreprocessInt8 | None,
) -> dict[str, torch.Tensor]:
    """One rank's checkpoint tensors -> {network parameter name: tensor}.

    `required` maps every parameter the network declares to its shape. Tensors the
    network does not declare are passed through (TensorRT-LLM warns about them); a
    declared parameter that nothing provides raises CheckpointError naming it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.endswith(".per_channel_scale") and t.dtype == torch.float32 and name in required:
            continue  # consumed with its int8 weight below
        base = name.removesuffix(".weight")
        if base.endswith(MLA_BARE):
            if base.endswith("kv_b_proj"):
                if base.replace("kv_b_proj", "k_b_proj_trans") in required:
                    out[base.replace("kv_b_proj", "k_b_proj_trans")] = k_b_proj_trans(t, mla)
                t = kv_b_trtllm(t, mla)
            out[base] = _fit(base, t, required.get(base))
        elif t.dtype == torch.int8 and name.endswith(".weight"):
            if preprocess_int8 is None:
                raise CheckpointError(f"{name}: int8_wo weights need TensorRT-LLM's preprocessing")
            scale_name = base + ".per_channel_scale"
            q, s = int8_weight_only(t, weights[scale_name], dtype, preprocess_int8)
            out[name] = _fit(name, q, required.get(name))
            out[scale_name] = _fit(scale_name, s, required.get(scale_name))
        else:
            out[name] = _fit(name, t, required.get(name))
    missing = sorted(set(required) - set(out))
    if missing:
        raise CheckpointError(
            f"the network needs {len(missing)} tensor(s) the checkpoint does not provide: "
            + ", ".join(missing[:5])
        )
    return out


def load_rank_weights(ckpt_dir: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """The tensors of `rank{rank}.safetensors` in the per-rank checkpoint `ckpt_dir`.

    safetensors' own loader stops at a corrupt header with a message that names neither the
    file nor (often) the tensor, from deep inside an engine build. So, as the converter's
    `--verify` does, the header is validated first (`check_rank_header`: offsets, dtypes,
    shapes via `safetensors_header`, then exactly the tensors the weight table gives this
    rank): a corrupt or mismatched rank file is one CheckpointError naming file and tensor.
    """
    cfg = read_rank_config(ckpt_dir)
    check_rank_header(cfg, rank)
    path = cfg.rank_file(rank)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # changed or unreadable since the check
        raise CheckpointError(f"{path}: cannot load ({str(e).splitlines()[0]})") from None
