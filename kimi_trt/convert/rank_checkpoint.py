"""The per-rank checkpoint's config.json: written by the converter, read by every executor.

The file is a TensorRT-LLM checkpoint config (architecture, mapping, quantization, MLA and
MoE fields - what a TensorRT-LLM model class reads) plus a `kimi_trt` object holding the
exact HF config, the weight format of each tensor class and the derived sizes. Executors
call `read_rank_config(dir)` and never need an HF tensor name (docs/per-rank-checkpoint.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kimi_trt.config import (
    LINEAR_CLASSES,
    ModelConfig,
    WeightFormats,
    model_config_from_dict,
    read_config_json,
)
from kimi_trt.convert.safetensors_header import read_safetensors_header
from kimi_trt.convert.safetensors_io import DTYPE_TO_ST
from kimi_trt.convert.weight_table import (
    FORMAT_VERSION,
    dtype_name,
    mla_dtype,
    rank_tensor_specs,
    vocab_size_padded,
)
from kimi_trt.errors import CheckpointError, ConfigError
from kimi_trt.json_files import read_json_or
from kimi_trt.mapping import Mapping

ARCHITECTURE = "KimiK2ForCausalLM"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class RankCheckpointConfig:
    """Everything an executor needs to load a per-rank checkpoint."""

    path: Path
    model: ModelConfig
    mapping: Mapping
    formats: WeightFormats
    vocab_size_padded: int
    mla_dtype: str  # numpy/torch dtype name of derived MLA tensors: bfloat16 or float32
    weight_block_size: tuple[int, int] | None
    config_hash: str
    tool_version: str

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    def rank_file(self, rank: int) -> Path:
        if not 0 <= rank < self.world_size:
            raise CheckpointError(f"{self.path}: rank {rank} outside world_size {self.world_size}")
        return self.path / rank_file_name(rank)


def check_rank_header(cfg: RankCheckpointConfig, rank: int) -> None:
    """rank{rank}.safetensors must have a valid header (`safetensors_header`) listing exactly
    the tensors the weight table gives this rank, with their dtypes and shapes. Checked
    before any weight is read; the error names the file and the first wrong tensor."""
    path = cfg.rank_file(rank)
    got = read_safetensors_header(path).tensors
    specs = rank_tensor_specs(cfg.model, cfg.mapping, cfg.formats, rank)
    for t in specs:
        entry = got.get(t.name)
        if entry is None:
            raise CheckpointError(f"{path}: tensor '{t.name}' is missing")
        want = DTYPE_TO_ST[t.dtype]
        if entry.dtype != want or entry.shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor '{t.name}' is {entry.dtype} {list(entry.shape)}, "
                f"expected {want} {list(t.shape)}"
            )
    extra = sorted(set(got) - {t.name for t in specs})
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}' ({len(extra)} extra)")


def checkpoint_hash(model: ModelConfig, mapping: Mapping, formats: WeightFormats) -> str:
    """Hash of everything that determines the rank files' bytes (recorded in config/manifest)."""
    blob = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "model": model.to_hf_dict(),
            "mapping": mapping.to_trtllm_dict(),
            "formats": formats.model_dump(mode="json"),
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _quant_algo(formats: WeightFormats) -> str | None:
    """TensorRT-LLM's QuantAlgo name when all linear classes share one format (informational)."""
    linear = {formats.for_class(c) for c in LINEAR_CLASSES}
    if len(linear) > 1:
        return "MIXED_PRECISION"
    return {
        "fp8_block": "FP8_BLOCK_SCALES",
        "fp8_ue8m0": "FP8_BLOCK_SCALES",
        "int8_wo": "W8A16",
    }.get(linear.pop())


def build_config(
    model: ModelConfig,
    mapping: Mapping,
    formats: WeightFormats,
    config_hash: str,
    tool_version: str,
) -> dict[str, Any]:
    """The per-rank checkpoint's config.json content (deterministic: no timestamps)."""
    block = model.weight_block_size or ((128, 128) if _uses_blocks(formats) else None)
    return {
        "architecture": ARCHITECTURE,
        "dtype": "bfloat16",
        "logits_dtype": "float32",
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_key_value_heads,
        "hidden_act": "swiglu",
        "intermediate_size": model.intermediate_size,
        "norm_epsilon": model.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": model.rope_theta,
        "rotary_scaling": _rotary_scaling(model),
        "mapping": mapping.to_trtllm_dict(),
        "quantization": {
            "quant_algo": _quant_algo(formats),
            "kv_cache_quant_algo": None,
            "group_size": block[1] if block else None,
        },
        "use_parallel_embedding": mapping.attn_tp_size > 1,
        "embedding_sharding_dim": 0,
        "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank,
        "qk_nope_head_dim": model.qk_nope_head_dim,
        "qk_rope_head_dim": model.qk_rope_head_dim,
        "v_head_dim": model.v_head_dim,
        "first_k_dense_replace": model.first_k_dense_replace,
        "moe_inter_size": model.moe_intermediate_size,
        "moe": _moe_section(model),
        "kimi_trt": {
            "format_version": FORMAT_VERSION,
            "tool_version": tool_version,
            "config_hash": config_hash,
            "world_size": mapping.world_size,
            "weight_formats": formats.model_dump(mode="json"),
            "mla_dtype": dtype_name(mla_dtype(formats)),
            "vocab_size_padded": vocab_size_padded(model, mapping),
            "weight_block_size": list(block) if block else None,
            "hf_config": model.to_hf_dict(),
        },
    }


def _rotary_scaling(model: ModelConfig) -> dict[str, Any] | None:
    """HF `rope_scaling` (YaRN) as TensorRT-LLM's `rotary_scaling`."""
    rs = model.rope_scaling
    if rs is None:
        return None
    return {
        "type": "yarn",
        "factor": rs.factor,
        "beta_fast": rs.beta_fast,
        "beta_slow": rs.beta_slow,
        "mscale": rs.mscale,
        "mscale_all_dim": rs.mscale_all_dim,
        "original_max_position_embeddings": rs.original_max_position_embeddings,
    }


def _moe_section(model: ModelConfig) -> dict[str, Any]:
    """TensorRT-LLM's `moe` config: expert count, top-k and the noaux_tc routing attributes."""
    return {
        "num_experts": model.n_routed_experts,
        "top_k": model.num_experts_per_tok,
        "shared_expert_intermediate_size": model.moe_intermediate_size * model.n_shared_experts,
        "topk_method": model.topk_method,
        "scoring_func": model.scoring_func,
        "norm_topk_prob": model.norm_topk_prob,
        "device_limited_n_group": model.n_group,
        "device_limited_topk_group": model.topk_group,
        "device_limited_routed_scaling_factor": model.routed_scaling_factor,
    }


def _uses_blocks(formats: WeightFormats) -> bool:
    return any(formats.for_class(c) in ("fp8_block", "fp8_ue8m0") for c in LINEAR_CLASSES)


def parse_config(raw: dict[str, Any], src: str, path: Path) -> RankCheckpointConfig:
    """Validate a per-rank config.json dict (errors name `src` and the key)."""
    ours = raw.get("kimi_trt")
    if not isinstance(ours, dict):
        raise ConfigError(f"{src}: not a kimi_trt per-rank checkpoint config (no 'kimi_trt' key)")
    version = ours.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"{src}: kimi_trt.format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        model = model_config_from_dict(ours["hf_config"], src=f"{src}: kimi_trt.hf_config")
        mapping = Mapping.from_trtllm_dict(raw["mapping"])
        formats = WeightFormats.model_validate(ours["weight_formats"])
        block = ours.get("weight_block_size")
        return RankCheckpointConfig(
            path=path,
            model=model,
            mapping=mapping,
            formats=formats,
            vocab_size_padded=int(ours["vocab_size_padded"]),
            mla_dtype=str(ours["mla_dtype"]),
            weight_block_size=tuple(block) if block else None,
            config_hash=str(ours["config_hash"]),
            tool_version=str(ours["tool_version"]),
        )
    except KeyError as e:
        raise ConfigError(f"{src}: missing key '{e.args[0]}'") from None
    except ValidationError as e:
        raise ConfigError(f"{src}: kimi_trt.weight_formats: {e.errors()[0]['msg']}") from None


def read_rank_config(path: str | Path) -> RankCheckpointConfig:
    """Read `<dir>/config.json` of a per-rank checkpoint (or engine dir holding one)."""
    d = Path(path)
    p = d / CONFIG_NAME
    return parse_config(read_config_json(p), str(p), d)


def is_rank_checkpoint(path: Path) -> bool:
    """True when `path` holds a per-rank checkpoint config.json (our `kimi_trt` key)."""
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        return False
    raw = read_json_or(p, None)
    return isinstance(raw, dict) and "kimi_trt" in raw
