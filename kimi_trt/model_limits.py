"""What a model config.json may hold before any table is built from it.

`config.model_config_from_dict` calls these on the raw values: scalar fields must have
their JSON type, sizes must be ones a real model can have, and the floats every forward
pass uses must be finite and positive. Without the bounds a typo such as
num_hidden_layers 10^9 makes convert/inspect/plan/build grow per-layer and per-expert
tables until memory runs out; here it is one line naming the key.
"""

from __future__ import annotations

import math
from typing import Any

from kimi_trt.errors import ConfigError

# Upper bounds on sizes, checked before any table is built: what no real model reaches
# (each >= 8x Kimi-K2's value), so a typo like num_hidden_layers 10^9 is refused in one line
# instead of growing per-layer and per-expert tables until memory runs out.
MAX_SIZES: dict[str, int] = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "moe_intermediate_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "n_routed_experts": 1 << 14,
    "num_experts_per_tok": 1 << 14,
    "n_shared_experts": 64,
    "n_group": 1 << 14,
    "topk_group": 1 << 14,
    "first_k_dense_replace": 1024,
    "moe_layer_freq": 1024,
    "num_nextn_predict_layers": 64,
    "q_lora_rank": 1 << 16,
    "kv_lora_rank": 1 << 14,
    "qk_nope_head_dim": 4096,
    "qk_rope_head_dim": 4096,
    "v_head_dim": 4096,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
# Layers x routed experts bounds the converter's tensor table (about ten entries per expert
# and layer): Kimi-K2 has 61 x 384 = 23,424; 2^17 still builds in seconds and < 1 GB.
MAX_EXPERT_INSTANCES = 1 << 17
# Floats that must be finite and positive (NaN or 0 here silently breaks every forward pass).
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")


def check_bounds(src: str, values: dict[str, Any]) -> None:
    """Refuse sizes no real model has (naming the key) and non-finite or non-positive floats."""
    for key, limit in MAX_SIZES.items():
        if isinstance(values.get(key), int) and values[key] > limit:
            raise ConfigError(
                f"{src}: '{key}' = {values[key]} is beyond any real model (at most {limit})"
            )
    instances = values["num_hidden_layers"] * values["n_routed_experts"]
    if instances > MAX_EXPERT_INSTANCES:
        raise ConfigError(
            f"{src}: num_hidden_layers x n_routed_experts = {instances} is beyond any real "
            f"model (at most {MAX_EXPERT_INSTANCES})"
        )
    for key in _POSITIVE_FLOATS:
        value = values[key]  # an int or float (check_types ran first); ints are finite
        if not (value > 0 and (isinstance(value, int) or math.isfinite(value))):
            raise ConfigError(f"{src}: '{key}' must be a finite number > 0, got {value!r}")


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def check_types(src: str, values: dict[str, Any], field_types: dict[str, str]) -> None:
    """Every scalar field must hold its JSON type: a string where a number belongs is one
    line here, not a TypeError deep inside a stage."""
    for name, kind in field_types.items():
        want = _JSON_TYPES.get(kind)
        if want is None or name not in values:
            continue
        value = values[name]
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            raise ConfigError(f"{src}: '{name}' must be {kind}, got {value!r:.60}")
