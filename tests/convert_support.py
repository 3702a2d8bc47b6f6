"""Helpers of the converter tests: the per-rank files gathered back into HF tensors.

The gather is written from docs/per-rank-checkpoint.md (the inverse of each shard rule
and fusion), not from the converter's transforms, so the two check each other.
`convert_and_check` converts and asserts that every written tensor, decoded, equals its
source exactly where the manifest says `exact`, and otherwise within the manifest's
`max_rel_err` (per source tensor: max|w' - w| <= max_rel_err * max|w|).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kimi_trt.config import Parallelism, WeightFormats, load_model_config
from kimi_trt.convert.converter import run_conversion
from kimi_trt.convert.formats import decode_weight
from kimi_trt.convert.fp8 import dequantize_block
from kimi_trt.convert.hf_layout import hf_tensors
from kimi_trt.convert.rank_checkpoint import read_rank_config
from kimi_trt.convert.weight_table import is_ignored, rank_tensor_specs
from kimi_trt.errors import ConfigError
from kimi_trt.mapping import Mapping, layout_problems
from kimi_trt.torch_bridge import to_numpy, to_torch


@functools.lru_cache(maxsize=4)
def load_source(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every HF weight of the checkpoint dequantised to float32 (scales folded in)."""
    cfg = load_model_config(ckpt)
    raw: dict[str, torch.Tensor] = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            raw.update({k: h.get_tensor(k) for k in h.keys()})
    out = {}
    for name, t in raw.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = raw.get(name + "_scale_inv")
        out[name] = (
            t.float()
            if scale is None
            else to_torch(dequantize_block(to_numpy(t), to_numpy(scale), cfg.weight_block_size))
        )
    return out


class Gathered:
    """Decoded per-rank tensors and the inverse of each shard rule."""

    def __init__(self, out: Path):
        self.cfg = read_rank_config(out)
        self.m = self.cfg.mapping
        self.ranks: list[dict[str, torch.Tensor]] = []
        for r in range(self.cfg.world_size):
            with safe_open(str(self.cfg.rank_file(r)), "pt") as f:
                self.ranks.append(self._decode(f, r))

    def _decode(self, f, rank: int) -> dict[str, torch.Tensor]:
        """Float32 value of every weight; linear weights decoded in their class's format."""
        cfg = self.cfg
        specs = rank_tensor_specs(cfg.model, self.m, cfg.formats, rank)
        out = {}
        for t in specs:
            if t.role == "scale":
                continue
            if t.rule.kind == "linear":
                fmt = cfg.formats.for_class(t.cls)
                get = lambda n: to_numpy(f.get_tensor(n))  # noqa: E731
                out[t.name] = to_torch(decode_weight(get, t.name, fmt, cfg.weight_block_size))
            else:
                out[t.name] = f.get_tensor(t.name).float()
        return out

    def attn_group(self) -> list[int]:
        """One rank per attention-TP rank, in attn_tp_rank order."""
        t = self.m.attn_tp_size
        return [
            next(r for r in range(self.m.world_size) if self.m.attn_tp_rank(r) == a)
            for a in range(t)
        ]

    def replicated(self, name: str) -> torch.Tensor:
        first = self.ranks[0][name]
        for r in self.ranks[1:]:
            assert torch.equal(r[name], first), f"{name} differs between ranks"
        return first

    def cat(self, name: str, dim: int) -> torch.Tensor:
        return torch.cat([self.ranks[r][name] for r in self.attn_group()], dim=dim)

    def experts(self, name: str, inner_dim: int, part: slice | None = None) -> torch.Tensor:
        """[E, ...] with each expert's moe_tp slices concatenated along `inner_dim`."""
        m, e_total = self.m, self.cfg.model.n_routed_experts
        per_expert: dict[int, dict[int, torch.Tensor]] = {}
        for r in range(m.world_size):
            w = self.ranks[r][name]
            for i, e in enumerate(m.experts_of(r, e_total)):
                x = w[i]
                if part is not None:
                    x = x[part]
                per_expert.setdefault(e, {})[m.moe_tp_rank(r)] = x
        return torch.stack(
            [
                torch.cat([per_expert[e][j] for j in range(m.moe_tp_size)], inner_dim)
                for e in range(e_total)
            ]
        )


def _gather_attention(g: Gathered, out: dict, p: str, s: str) -> None:
    mc = g.cfg.model
    fa = g.replicated(p + "attention.fused_a.weight")
    ql = mc.q_lora_rank or 0
    out[s + "self_attn.kv_a_proj_with_mqa.weight"] = fa[ql:]
    out[s + "self_attn.kv_a_layernorm.weight"] = g.replicated(p + "attention.kv_a_layernorm.weight")
    if mc.q_lora_rank is None:
        out[s + "self_attn.q_proj.weight"] = g.cat(p + "attention.q_proj.weight", 0)
    else:
        out[s + "self_attn.q_a_proj.weight"] = fa[:ql]
        out[s + "self_attn.q_a_layernorm.weight"] = g.replicated(
            p + "attention.q_a_layernorm.weight"
        )
        out[s + "self_attn.q_b_proj.weight"] = g.cat(p + "attention.q_b_proj.weight", 0)
    out[s + "self_attn.kv_b_proj.weight"] = g.cat(p + "attention.kv_b_proj.weight", 0)
    out[s + "self_attn.o_proj.weight"] = g.cat(p + "attention.dense.weight", 1)


def _gather_moe(g: Gathered, out: dict, p: str, s: str) -> None:
    mc = g.cfg.model
    i_l = mc.moe_intermediate_size // g.m.moe_tp_size
    out[s + "mlp.gate.weight"] = g.replicated(p + "mlp.router.weight")
    out[s + "mlp.gate.e_score_correction_bias"] = g.replicated(p + "mlp.e_score_correction_bias")
    up = g.experts(p + "mlp.fc.weight", 0, slice(0, i_l))
    gate = g.experts(p + "mlp.fc.weight", 0, slice(i_l, 2 * i_l))
    down = g.experts(p + "mlp.proj.weight", 1)
    for e in range(mc.n_routed_experts):
        out[s + f"mlp.experts.{e}.up_proj.weight"] = up[e]
        out[s + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
        out[s + f"mlp.experts.{e}.down_proj.weight"] = down[e]
    if not mc.n_shared_experts:
        return
    sl = mc.moe_intermediate_size * mc.n_shared_experts // g.m.attn_tp_size
    fc = [g.ranks[r][p + "mlp.shared_expert.fc.weight"] for r in g.attn_group()]
    out[s + "mlp.shared_experts.up_proj.weight"] = torch.cat([x[:sl] for x in fc])
    out[s + "mlp.shared_experts.gate_proj.weight"] = torch.cat([x[sl:] for x in fc])
    out[s + "mlp.shared_experts.down_proj.weight"] = g.cat(p + "mlp.shared_expert.proj.weight", 1)


def gather_source(g: Gathered) -> dict[str, torch.Tensor]:
    """Rebuild every consumed HF tensor (float32) from the per-rank files."""
    mc = g.cfg.model
    out: dict[str, torch.Tensor] = {}
    emb = g.cat("transformer.vocab_embedding.weight", 0)
    assert not emb[mc.vocab_size :].any(), "vocab pad rows must be zero"
    out["model.embed_tokens.weight"] = emb[: mc.vocab_size]
    head = g.cat("lm_head.weight", 0)
    assert not head[mc.vocab_size :].any(), "vocab pad rows must be zero"
    if mc.tie_word_embeddings:
        assert torch.equal(head[: mc.vocab_size], out["model.embed_tokens.weight"])
    else:
        out["lm_head.weight"] = head[: mc.vocab_size]
    out["model.norm.weight"] = g.replicated("transformer.ln_f.weight")
    for layer in range(mc.num_hidden_layers):
        p, s = f"transformer.layers.{layer}.", f"model.layers.{layer}."
        out[s + "input_layernorm.weight"] = g.replicated(p + "input_layernorm.weight")
        out[s + "post_attention_layernorm.weight"] = g.replicated(p + "post_layernorm.weight")
        _gather_attention(g, out, p, s)
        if mc.layer_kinds[layer] == "dense":
            out[s + "mlp.gate_proj.weight"] = g.cat(p + "mlp.fc.weight", 0)
            out[s + "mlp.up_proj.weight"] = g.cat(p + "mlp.gate.weight", 0)
            out[s + "mlp.down_proj.weight"] = g.cat(p + "mlp.proj.weight", 1)
        else:
            _gather_moe(g, out, p, s)
    return out


def classes_of(model) -> dict[str, str]:
    return {t.name: t.cls for t in hf_tensors(model)}


# The converter forms Wk_nope^T @ Wq_nope in float32 (a sum over qk_nope_head_dim products);
# its storage rounding is what the manifest reports. Against the float64 product the
# float32 one may differ by the accumulation's rounding, which depends on the BLAS kernel
# (numpy's and torch's float32 matmuls agree bit for bit on some CPUs, not on others).
FP32_PRODUCT_REL_ERR = 1e-6


def check_fused_q(g: Gathered, src: dict[str, torch.Tensor], manifest: dict) -> None:
    """fused_q_proj equals the absorption formula of the doc (computed here in float64),
    within its reported storage rounding plus float32 accumulation."""
    mc = g.cfg.model
    bound = manifest["derived_error"]["attention.fused_q_proj"]["max_rel_err"]
    bound += FP32_PRODUCT_REL_ERR
    hl = mc.num_attention_heads // g.m.attn_tp_size
    q_name = "q_proj" if mc.q_lora_rank is None else "q_b_proj"
    for layer in range(mc.num_hidden_layers):
        s = f"model.layers.{layer}.self_attn."
        wq = src[s + q_name + ".weight"].double().view(mc.num_attention_heads, mc.qk_head_dim, -1)
        wkv = src[s + "kv_b_proj.weight"].double()
        wkv = wkv.view(mc.num_attention_heads, -1, mc.kv_lora_rank)
        nope = mc.qk_nope_head_dim
        ref = torch.cat(
            [torch.einsum("hdq,hdk->hkq", wq[:, :nope], wkv[:, :nope]), wq[:, nope:]], dim=1
        )
        got = g.cat(f"transformer.layers.{layer}.attention.fused_q_proj", 0).double()
        got = got.view(mc.num_attention_heads, mc.kv_a_width, wq.shape[-1])
        for n in range(mc.num_attention_heads):  # bound is per head (one piece per head)
            err = (got[n] - ref[n]).abs().max()
            assert err <= bound * ref[n].abs().max() * 1.0001 + 1e-12, (layer, n)
        assert got.shape[0] == hl * g.m.attn_tp_size


def check_headers(out: Path, model, mapping: Mapping, formats: WeightFormats) -> None:
    """Every target produced, nothing else, with the table's shapes."""
    for r in range(mapping.world_size):
        with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        specs = rank_tensor_specs(model, mapping, formats, r)
        assert got == {t.name: t.shape for t in specs}
        size = (out / f"rank{r}.safetensors").stat().st_size
        assert sum(t.nbytes for t in specs) < size < sum(t.nbytes for t in specs) + 65536


def check_written(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every written tensor, decoded, equals its source exactly where the manifest says
    `exact`, else within its class's max_rel_err. Returns the gathered (decoded) tensors."""
    manifest = json.loads((out / "manifest.json").read_text())
    g = Gathered(out)
    model = g.cfg.model
    check_headers(out, model, g.m, g.cfg.formats)
    src = load_source(ckpt)
    gathered = gather_source(g)
    assert set(gathered) | {n for n in src if is_ignored(n, model)} >= {
        n for n in src if not n.endswith("_scale_inv")
    }
    errors = manifest["requant_error"]
    cls_of = classes_of(model)
    for name, got in gathered.items():
        want = src[name]
        assert got.shape == want.shape, name
        cls = cls_of[name]
        if cls not in errors or errors[cls]["exact"]:
            assert torch.equal(got, want), f"{name} not reproduced exactly"
        else:
            bound = errors[cls]["max_rel_err"] * want.abs().max() * 1.0001 + 1e-12
            assert (got - want).abs().max() <= bound, name
    check_fused_q(g, src, manifest)
    return gathered


def convert_and_check(ckpt: Path, par: Parallelism, formats: WeightFormats) -> None:
    """Convert into a temporary dir (or see the layout refused) and `check_written`."""
    model = load_model_config(ckpt)
    mapping = Mapping.from_parallelism(par)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if layout_problems(model, mapping):
            with pytest.raises(ConfigError, match="does not fit the model"):
                run_conversion(ckpt, out, par, formats, progress=False)
            assert not (out / "manifest.json").exists()
            return
        res = run_conversion(ckpt, out, par, formats, progress=False, jobs=2)
        assert json.loads((out / "manifest.json").read_text()) == res.manifest
        check_written(ckpt, out)
