"""KimiK2ForCausalLM: Kimi-K2 (DeepSeek-V3 architecture) as a TensorRT-LLM engine model.

Loadable two ways, both reading a kimi_trt per-rank checkpoint (docs/per-rank-checkpoint.md):
    trtllm-build --checkpoint_dir CKPT --model_cls_file kimi_trt/trtllm/model.py \
                 --model_cls_name KimiK2ForCausalLM ...
    kimi-trt build (kimi_trt/trtllm/compile.py calls `from_checkpoint` per rank)
`trtllm-build` loads this file by path (`SourceFileLoader`), so it uses absolute imports.

Built from TensorRT-LLM 1.2's blocks, following `tensorrt_llm/models/deepseek_v2/model.py`
(DeepseekV2DecoderLayer / DeepseekV2Model / DeepseekV2ForCausalLM) for everything but
routing:
- attention: `tensorrt_llm.layers.DeepseekV2Attention` (`tensorrt_llm/layers/attention.py`):
  MLA as MQA over the latent (one KV head of kv_lora_rank + qk_rope_head_dim), the
  `gpt_attention` plugin with `is_mla_enabled_flag`, YaRN cos/sin from `rotary_scaling`,
  paged KV cache (the plugin config of the build).
- dense layers (< first_k_dense_replace): `GatedMLP` with silu (`tensorrt_llm/layers/mlp.py`).
- MoE layers: `KimiK2MoE` = TensorRT-LLM's `SharedMoE` (`tensorrt_llm/layers/moe.py`) whose
  routing is replaced: router logits (fp32 `RowLinear`) + `e_score_correction_bias` ->
  our `kimi_trt::noaux_tc_router` TensorRT plugin -> (token_selected_experts int32 [T,k],
  token_final_scales fp32 [T,k]) -> `MixtureOfExperts.forward_experts`, i.e. the
  `MixtureOfExperts` plugin with EP/moe-TP from the Mapping, plus the shared expert and
  one all-reduce over the TP group.
- TP/EP: the `Mapping` in the checkpoint config (`tensorrt_llm/mapping.py`).
Weight formats: `kimi_trt.trtllm.support` lists what these plugins accept; the quant
config is derived here from the checkpoint's `kimi_trt.weight_formats` (weight-only int8
for the classes stored as int8_wo, everything else excluded), and `kimi_trt.trtllm.weights`
turns the checkpoint's tensors into the parameters declared below.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tensorrt_llm._common import default_trtnet
from tensorrt_llm._utils import pad_vocab_size, str_dtype_to_torch
from tensorrt_llm.functional import (
    AttentionMaskType,
    PositionEmbeddingType,
    SideStreamIDType,
    _create_tensor,
    allreduce,
    cast,
)
from tensorrt_llm.layers import (
    ColumnLinear,
    DeepseekV2Attention,
    Embedding,
    GatedMLP,
    MoeConfig,
    RmsNorm,
    SharedMoE,
)
from tensorrt_llm.models.modeling_utils import (
    DecoderLayerList,
    DecoderModelForCausalLM,
    PretrainedConfig,
    QuantConfig,
)
from tensorrt_llm.module import Module
from tensorrt_llm.parameter import Parameter
from tensorrt_llm.plugin import init_all_reduce_helper
from tensorrt_llm.quantization import QuantAlgo, QuantMode
from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm

from kimi_trt.plugins.routing import RouterParams
from kimi_trt.plugins.trt_plugin import add_noaux_tc_router_layer
from kimi_trt.trtllm.weights import MlaDims, adapt_rank_weights, load_rank_weights

# Modules kept in the model dtype whatever the formats (TensorRT-LLM's default list plus
# the MLA output projection, whose plugin path takes no weight-only int8).
ALWAYS_UNQUANTIZED = ["*lm_head", "*router", "*vocab_embedding", "*fused_a", "*attention.dense"]
DENSE_MODULES = ["*mlp.fc", "*mlp.gate", "*mlp.proj"]
SHARED_MODULES = ["*shared_expert.fc", "*shared_expert.proj"]


def kimi_formats(config: PretrainedConfig) -> dict[str, str]:
    ours = getattr(config, "kimi_trt", None)
    if not isinstance(ours, dict) or "weight_formats" not in ours:
        raise ValueError(
            "config.json has no kimi_trt.weight_formats: not a kimi_trt per-rank checkpoint"
        )
    formats = dict(ours["weight_formats"])
    formats["shared_expert"] = formats.get("shared_expert") or formats["dense_mlp"]
    return formats


def quant_config_for(formats: dict[str, str]) -> QuantConfig:
    """W8A16 for the classes stored as int8_wo, all other Linear layers excluded."""
    int8 = [c for c in ("dense_mlp", "shared_expert", "experts") if formats[c] == "int8_wo"]
    if not int8:
        return QuantConfig()
    exclude = list(ALWAYS_UNQUANTIZED)
    if "dense_mlp" not in int8:
        exclude += DENSE_MODULES
    if "shared_expert" not in int8:
        exclude += SHARED_MODULES
    return QuantConfig(quant_algo=QuantAlgo.W8A16, exclude_modules=exclude)


class KimiK2MoE(SharedMoE):
    """SharedMoE with noaux_tc routing (sigmoid + correction bias, grouped top-k) by our plugin.

    `MixtureOfExperts.forward` only offers softmax-based routing modes; this class keeps
    its router, expert weights and `forward_experts` (the MixtureOfExperts plugin call)
    and computes the selected experts and their final scales with `kimi_trt::noaux_tc_router`.
    """

    def __init__(self, *, router_params: RouterParams, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.router_params = router_params
        self.e_score_correction_bias = Parameter(shape=(self.num_experts,), dtype="float32")

    def forward(self, hidden_states, lora_layer_params=None):
        logits = self.router(cast(hidden_states, "float32"))
        bias = self.e_score_correction_bias.value
        # hidden_states are [T, H] (remove_input_padding), so logits are [T, E] as the plugin needs.
        layer = add_noaux_tc_router_layer(
            default_trtnet(), logits.trt_tensor, bias.trt_tensor, self.router_params
        )
        routed = self.forward_experts(
            hidden_states,
            _create_tensor(layer.get_output(0), layer),  # token_selected_experts int32 [T, k]
            _create_tensor(layer.get_output(1), layer),  # token_final_scales fp32 [T, k]
            lora_layer_params,
            SideStreamIDType.disable,
        )
        out = routed + self.shared_expert(hidden_states, lora_layer_params=lora_layer_params)
        if self.tp_size > 1 and self.tp_group is not None:
            out = allreduce(out, self.tp_group)
        return out


def _moe_config(config: PretrainedConfig) -> tuple[MoeConfig, RouterParams]:
    moe = config.moe
    cfg = MoeConfig(
        num_experts=moe["num_experts"],
        shared_expert_intermediate_size=moe["shared_expert_intermediate_size"],
        top_k=moe["top_k"],
        normalization_mode=MoeConfig.ExpertScaleNormalizationMode.NONE,
    ).validate()
    params = RouterParams(
        top_k=moe["top_k"],
        n_group=moe["device_limited_n_group"],
        topk_group=moe["device_limited_topk_group"],
        routed_scaling_factor=moe["device_limited_routed_scaling_factor"],
        norm_topk_prob=moe["norm_topk_prob"],
    )
    return cfg, params


class KimiK2DecoderLayer(Module):
    """RMSNorm -> MLA -> residual -> RMSNorm -> dense MLP or MoE -> residual."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        m = config.mapping
        local_idx = layer_idx - m.pp_layers(config.num_hidden_layers)[0]
        rs = config.rotary_scaling
        self.input_layernorm = RmsNorm(
            config.hidden_size, eps=config.norm_epsilon, dtype=config.dtype
        )
        self.attention = DeepseekV2Attention(
            local_layer_idx=local_idx,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            max_position_embeddings=config.max_position_embeddings,
            eps=config.norm_epsilon,
            attention_mask_type=AttentionMaskType.causal,
            dtype=config.dtype,
            position_embedding_type=PositionEmbeddingType.learned_absolute,
            rotary_embedding_base=config.rotary_base,
            rotary_embedding_scaling=None,
            rotary_embedding_beta_fast=rs["beta_fast"],
            rotary_embedding_beta_slow=rs["beta_slow"],
            rotary_embedding_mscale=rs["mscale"],
            rotary_embedding_mscale_all_dim=rs["mscale_all_dim"],
            rotary_embedding_origin_max_position=rs["original_max_position_embeddings"],
            rotary_scaling=rs,
            tp_group=m.tp_group,
            tp_size=m.tp_size,
            tp_rank=m.tp_rank,
        )
        common = dict(
            hidden_size=config.hidden_size,
            dtype=config.dtype,
            bias=False,
            tp_group=m.tp_group,
            tp_size=m.tp_size,
        )
        if layer_idx < config.first_k_dense_replace:
            self.mlp = GatedMLP(
                ffn_hidden_size=config.intermediate_size,
                hidden_act="silu",
                quant_mode=config.quant_mode,
                **common,
            )
        else:
            moe_cfg, router = _moe_config(config)
            experts_int8 = kimi_formats(config)["experts"] == "int8_wo"
            self.mlp = KimiK2MoE(
                router_params=router,
                moe_config=moe_cfg,
                ffn_hidden_size=config.moe_inter_size,
                hidden_act="swiglu",
                mapping=m,
                quant_mode=config.quant_mode if experts_int8 else QuantMode(0),
                **common,
            )
        self.post_layernorm = RmsNorm(
            config.hidden_size, eps=config.norm_epsilon, dtype=config.dtype
        )

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        use_cache=False,
        spec_decoding_params=None,
        kv_cache_params=None,
        attention_params=None,
    ):
        residual = hidden_states
        attn = self.attention(
            self.input_layernorm(hidden_states),
            use_cache=use_cache,
            spec_decoding_params=spec_decoding_params,
            kv_cache_params=kv_cache_params,
            attention_params=attention_params,
        )
        if use_cache:
            attn, presents = attn
        hidden_states = residual + attn
        hidden_states = hidden_states + self.mlp(self.post_layernorm(hidden_states))
        return (hidden_states, presents) if use_cache else hidden_states


class KimiK2Model(Module):
    """Embedding -> decoder layers -> final RMSNorm (pp = 1: every rank holds all layers)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        init_all_reduce_helper()
        self.mapping = config.mapping
        self.vocab_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = DecoderLayerList(KimiK2DecoderLayer, config)
        self.ln_f = RmsNorm(config.hidden_size, eps=config.norm_epsilon, dtype=config.dtype)

    def forward(
        self,
        input_ids,
        position_ids=None,
        use_cache=False,
        attention_mask=None,
        spec_decoding_params=None,
        kv_cache_params=None,
        attention_params=None,
        hidden_states=None,
        prompt_embedding_table=None,
        prompt_tasks=None,
        prompt_vocab_size=None,
    ):
        hidden_states = self.vocab_embedding(input_ids)
        hidden_states = self.layers.forward(
            hidden_states,
            use_cache=use_cache,
            kv_cache_params=kv_cache_params,
            attention_params=attention_params,
            spec_decoding_params=spec_decoding_params,
        )
        if use_cache:
            hidden_states, presents = hidden_states
        hidden_states = self.ln_f(hidden_states)
        return (hidden_states, tuple(presents)) if use_cache else hidden_states


class KimiK2ForCausalLM(DecoderModelForCausalLM):
    """The model class `trtllm-build --model_cls_name KimiK2ForCausalLM` and our builder load."""

    config_class = PretrainedConfig

    def __init__(self, config: PretrainedConfig) -> None:
        # The checkpoint's quant_algo is informational; the network's quantization follows
        # the per-class formats (set before PretrainedModel.__post_init__ quantizes).
        config.quantization = quant_config_for(kimi_formats(config))
        transformer = KimiK2Model(config)
        lm_head = ColumnLinear(
            config.hidden_size,
            pad_vocab_size(config.vocab_size, config.mapping.tp_size),
            bias=False,
            dtype=config.dtype,
            tp_group=config.mapping.tp_group,
            tp_size=config.mapping.tp_size,
            gather_output=True,
        )
        super().__init__(config, transformer, lm_head)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str,
        rank: int | None = None,
        config: PretrainedConfig | None = None,
        *,
        preprocess_weights_hook=None,
    ):
        """Build rank `rank`'s network and load `rank{rank}.safetensors` into it (header and
        tensor list checked first: `load_rank_weights`)."""
        if config is None:
            config = PretrainedConfig.from_json_file(os.path.join(ckpt_dir, "config.json"))
        if rank is not None:
            config.set_rank(rank)
        model = cls(config)
        weights = load_rank_weights(ckpt_dir, config.mapping.rank)
        if preprocess_weights_hook is not None:
            weights = preprocess_weights_hook(weights)
        model.load(model.adapt_weights(weights))
        return model

    def adapt_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> this network's parameters (kimi_trt.trtllm.weights)."""
        c = self.config
        required = {
            name: tuple(p.shape) for name, p in self.named_parameters() if not p.is_inited()
        }
        mla = MlaDims(
            heads=c.num_attention_heads // c.mapping.tp_size,
            nope=c.qk_nope_head_dim,
            v=c.v_head_dim,
            kv_lora=c.kv_lora_rank,
        )
        dtype = str_dtype_to_torch(c.dtype)

        def preprocess(q: torch.Tensor) -> torch.Tensor:
            return preprocess_weights_for_mixed_gemm(q, torch.int8, dtype)

        return adapt_rank_weights(weights, required, mla, dtype, preprocess)
