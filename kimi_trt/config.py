"""Typed configuration: the HF model config and the YAML build config.

docs/design.md principle 5: the HF `config.json` and a build YAML resolve into frozen, typed
objects before anything heavy runs. `ModelConfig` holds every field of Kimi-K2's
config.json plus the values derived from them (softmax scale with YaRN mscale, YaRN
inverse frequencies, which layers are dense/MoE, which are MTP and skipped) so no other
module re-derives them. `BuildConfig` is the YAML: unknown keys are errors naming the
file and key. All errors are `ConfigError` with one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kimi_trt.errors import ConfigError
from kimi_trt.json_files import read_json
from kimi_trt.model_limits import check_bounds, check_types

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_ARCHITECTURE = "DeepseekV3ForCausalLM"


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters as in config.json `rope_scaling` (type yarn)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    type: str = "yarn"


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's YaRN magnitude correction: 0.1 * m * ln(factor) + 1 (1.0 for factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Every field of a Kimi-K2 / DeepSeek-V3 config.json, validated, plus derived values."""

    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    q_lora_rank: int | None  # None: a direct q_proj, no q LoRA (DeepSeek-V2-Lite, Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    bos_token_id: int
    eos_token_id: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    # Block size of FP8 weights, or None for an unquantised (bf16) checkpoint.
    weight_block_size: tuple[int, int] | None
    model_type: str = "kimi_k2"
    architectures: tuple[str, ...] = (SUPPORTED_ARCHITECTURE,)
    hidden_act: str = "silu"
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    use_cache: bool = True
    transformers_version: str | None = None
    # Keys we keep verbatim so the config round-trips (e.g. quantization_config details).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- derived values -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_a_width(self) -> int:
        """Rows of kv_a_proj_with_mqa: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier on cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim) (1.0 for K2)."""
        rs = self.rope_scaling
        if rs is None:
            return 1.0
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)

    def rope_inv_freq(self) -> list[float]:
        """YaRN inverse frequencies over the rope dims (kimi-k2.md "Forward math")."""
        dim = self.qk_rope_head_dim
        base = self.rope_theta
        inv = [base ** (-(2 * i) / dim) for i in range(dim // 2)]
        rs = self.rope_scaling
        if rs is None:
            return inv

        def corr(rot: float) -> float:
            orig = rs.original_max_position_embeddings
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(rs.beta_fast)), 0)
        high = min(math.ceil(corr(rs.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(inv):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            out.append(f / rs.factor * ramp + f * (1.0 - ramp))
        return out

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'dense' or 'moe' for each decoder layer 0..num_hidden_layers-1."""
        return tuple(
            "moe"
            if self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
            else "dense"
            for i in range(self.num_hidden_layers)
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "dense")

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """Checkpoint layer indices of multi-token-prediction modules: skipped by every stage."""
        n = self.num_hidden_layers
        return tuple(range(n, n + self.num_nextn_predict_layers))

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def is_fp8(self) -> bool:
        return self.weight_block_size is not None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json this object was read from (field order as Kimi-K2 writes it)."""
        d = asdict(self)
        extra = d.pop("extra")
        block = d.pop("weight_block_size")
        d["architectures"] = list(d["architectures"])
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        if block is not None:
            qc = dict(extra.get("quantization_config") or {})
            qc.setdefault("activation_scheme", "dynamic")
            qc.setdefault("fmt", "e4m3")
            qc["quant_method"] = "fp8"
            qc["weight_block_size"] = list(block)
            d["quantization_config"] = qc
        for k, v in extra.items():
            if k != "quantization_config":
                d.setdefault(k, v)
        return dict(sorted(d.items()))

    def config_hash(self) -> str:
        """Stable hash of the model config, recorded in manifests."""
        blob = json.dumps(self.to_hf_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_REQUIRED_INT = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "vocab_size",
    "max_position_embeddings",
)
_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
}


def _check_int(src: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{src}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_rope_scaling(src: str, raw: Any) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: 'rope_scaling' must be an object or null, got {raw!r}")
    kind = raw.get("type", raw.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{src}: rope_scaling.type must be 'yarn', got {kind!r}")
    try:
        rs = RopeScaling(
            factor=float(raw["factor"]),
            original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
            beta_fast=float(raw.get("beta_fast", 32.0)),
            beta_slow=float(raw.get("beta_slow", 1.0)),
            mscale=float(raw.get("mscale", 1.0)),
            mscale_all_dim=float(raw.get("mscale_all_dim", 0.0)),
        )
    except KeyError as e:
        raise ConfigError(f"{src}: rope_scaling is missing '{e.args[0]}'") from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{src}: rope_scaling values must be numbers, got {raw!r:.120}") from None
    numbers = asdict(rs)
    numbers.pop("type")
    for key, value in numbers.items():
        if not math.isfinite(value):
            raise ConfigError(f"{src}: rope_scaling.{key} must be finite, got {value!r}")
    _check_int(
        src, "rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings
    )
    return rs


def _parse_block_size(src: str, raw: Any) -> tuple[int, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: 'quantization_config' must be an object, got {raw!r:.60}")
    if raw.get("quant_method") != "fp8":
        raise ConfigError(
            f"{src}: quantization_config.quant_method must be 'fp8', got {raw.get('quant_method')!r}"
        )
    block = raw.get("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{src}: quantization_config.weight_block_size must be [rows, cols], got {block!r}"
        )
    return (block[0], block[1])


def model_config_from_dict(raw: dict[str, Any], src: str = "config.json") -> ModelConfig:
    """Validate an HF config dict into a ModelConfig; errors name `src` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{src}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    archs = raw.get("architectures") or [SUPPORTED_ARCHITECTURE]
    if SUPPORTED_ARCHITECTURE not in archs:
        raise ConfigError(f"{src}: architectures {archs} must include {SUPPORTED_ARCHITECTURE}")
    for key in _REQUIRED_INT:
        if key not in raw:
            raise ConfigError(f"{src}: missing required field '{key}'")
        _check_int(src, key, raw[key])
    for key, want in (
        ("hidden_act", "silu"),
        ("scoring_func", "sigmoid"),
        ("topk_method", "noaux_tc"),
        ("attention_bias", False),
        ("rope_interleave", True),
    ):
        if raw.get(key, want) != want:
            raise ConfigError(f"{src}: '{key}' must be {want!r}, got {raw[key]!r}")
    known = set(ModelConfig.__dataclass_fields__) - {"extra", "weight_block_size", "rope_scaling"}
    values: dict[str, Any] = {**_DEFAULTS}
    values.update({k: v for k, v in raw.items() if k in known})
    values["architectures"] = tuple(archs)
    values["num_key_value_heads"] = raw.get("num_key_value_heads", raw["num_attention_heads"])
    values["rope_scaling"] = _parse_rope_scaling(src, raw.get("rope_scaling"))
    values["weight_block_size"] = _parse_block_size(src, raw.get("quantization_config"))
    values["extra"] = {k: v for k, v in raw.items() if k not in known and k != "rope_scaling"}
    if "q_lora_rank" not in raw:
        raise ConfigError(
            f"{src}: missing required field 'q_lora_rank' (null for a direct q_proj without q LoRA)"
        )
    if values["q_lora_rank"] is not None:
        _check_int(src, "q_lora_rank", values["q_lora_rank"])
    for key in ("n_group", "topk_group", "moe_layer_freq"):
        _check_int(src, key, values[key])
    for key in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
        _check_int(src, key, values[key], minimum=0)
    _check_int(src, "num_key_value_heads", values["num_key_value_heads"])
    check_types(src, values, {f.name: f.type for f in fields(ModelConfig)})
    check_bounds(src, values)
    cfg = ModelConfig(**values)
    _check_consistency(src, cfg)
    return cfg


def _check_consistency(src: str, cfg: ModelConfig) -> None:
    e, g = cfg.n_routed_experts, cfg.n_group
    if e % g:
        raise ConfigError(f"{src}: n_routed_experts={e} is not divisible by n_group={g}")
    if cfg.topk_group > g:
        raise ConfigError(f"{src}: topk_group={cfg.topk_group} exceeds n_group={g}")
    if cfg.num_experts_per_tok > cfg.topk_group * (e // g):
        raise ConfigError(
            f"{src}: num_experts_per_tok={cfg.num_experts_per_tok} exceeds the "
            f"{cfg.topk_group * (e // g)} experts in topk_group={cfg.topk_group} groups"
        )
    if g > 1 and e // g < 2:
        raise ConfigError(
            f"{src}: groups of {e // g} expert(s); group scoring needs >= 2 per group"
        )
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"{src}: qk_rope_head_dim={cfg.qk_rope_head_dim} must be even")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        raise ConfigError(
            f"{src}: first_k_dense_replace={cfg.first_k_dense_replace} exceeds num_hidden_layers={cfg.num_hidden_layers}"
        )
    rs = cfg.rope_scaling
    if rs is not None and rs.factor < 1.0:
        raise ConfigError(f"{src}: rope_scaling.factor={rs.factor} must be >= 1")


def read_config_json(p: Path) -> Any:
    """The parsed JSON of a config.json (HF or per-rank); a one-line ConfigError naming the
    file when it is absent, unreadable or malformed."""
    if not p.is_file():
        raise ConfigError(f"{p}: config.json not found")
    return read_json(p, ConfigError)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint dir (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    return model_config_from_dict(read_config_json(p), src=str(p))


# ---- build config (YAML) -----------------------------------------------------------------

GpuName = Literal["h100", "h200", "b200", "gb200", "cpu"]
WeightFormat = Literal["fp8_block", "bf16", "int8_wo", "fp8_ue8m0", "fp32"]
KvCacheDtype = Literal["fp8", "bf16", "fp16", "fp32"]
# trtllm: TensorRT-LLM engines (engine workflow); torch: our executor; llmapi: TensorRT-LLM's
# PyTorch backend driven through its LLM API (docs/design.md "Backends").
Backend = Literal["trtllm", "torch", "llmapi"]
# TensorRT-LLM 1.2 MoeConfig.backend (tensorrt_llm/llmapi/llm_args.py).
MoeBackend = Literal[
    "AUTO", "CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "VANILLA", "TRITON"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parallelism(_Strict):
    """Layout over ranks. tp is the world size (pp is fixed at 1); ep * moe_tp must equal tp."""

    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    moe_tp: int = Field(1, ge=1)
    attention_dp: bool = False
    pp: Literal[1] = 1

    @model_validator(mode="after")
    def _moe_split(self) -> Parallelism:
        if self.ep * self.moe_tp != self.tp:
            raise ValueError(
                f"ep ({self.ep}) x moe_tp ({self.moe_tp}) must equal tp ({self.tp}): "
                "experts are split over the same ranks as attention"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


# The tensor classes a WeightFormat applies to (linear layers; embeddings have their own).
LINEAR_CLASSES = ("attention", "dense_mlp", "shared_expert", "experts")


class WeightFormats(_Strict):
    """Storage format per tensor class. Norms, router and bias are always kept as-is."""

    attention: WeightFormat = "fp8_block"
    dense_mlp: WeightFormat = "fp8_block"
    shared_expert: WeightFormat | None = None  # None: same as dense_mlp
    experts: WeightFormat = "fp8_block"
    embeddings: Literal["bf16", "fp32"] = "bf16"

    def for_class(self, cls: str) -> str:
        if cls == "shared_expert":
            return self.shared_expert or self.dense_mlp
        return getattr(self, cls)


class Limits(_Strict):
    max_batch_size: int = Field(8, ge=1)
    max_input_len: int = Field(2048, ge=1)
    max_seq_len: int = Field(4096, ge=2)
    max_num_tokens: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) must be < max_seq_len ({self.max_seq_len})"
            )
        return self


class LlmApiSettings(_Strict):
    """Backend llmapi's tuning knobs that are neither layout nor limits. kimi_trt.llmapi.options
    maps them to TorchLlmArgs keys (moe_config.backend, cuda_graph_config, stream_interval)."""

    moe_backend: MoeBackend = "AUTO"
    cuda_graph_max_batch_size: int | None = Field(None, ge=1)  # None: limits.max_batch_size
    cuda_graph_padding: bool = True
    stream_interval: int = Field(1, ge=1)


class BuildConfig(_Strict):
    """A build YAML. Relative paths are resolved against the YAML file's directory."""

    checkpoint: Path
    output_dir: Path
    tokenizer_dir: Path | None = None  # default: the checkpoint dir
    gpu: GpuName = "h200"
    backend: Backend = "llmapi"
    parallelism: Parallelism = Parallelism()
    weights: WeightFormats = WeightFormats()
    kv_cache_dtype: KvCacheDtype = "bf16"
    kv_cache_free_gpu_mem_fraction: float = Field(0.9, gt=0.0, le=1.0)
    limits: Limits = Limits()
    convert_dir: Path | None = None  # default: <output_dir>/checkpoint
    llm_api: LlmApiSettings = LlmApiSettings()

    @property
    def resolved_tokenizer_dir(self) -> Path:
        return self.tokenizer_dir or self.checkpoint

    @property
    def resolved_convert_dir(self) -> Path:
        return self.convert_dir or (self.output_dir / "checkpoint")

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_validation_error(src: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{src}: unknown key '{loc}'"
    if first["type"] == "missing":
        return f"{src}: missing required key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{src}: {loc}: {msg} (got {first.get('input')!r})"


def build_config_from_dict(raw: Any, src: str, base_dir: Path | None = None) -> BuildConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a YAML mapping at the top level")
    try:
        cfg = BuildConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(src, e)) from None
    if base_dir is None:
        return cfg
    updates = {}
    for key in ("checkpoint", "output_dir", "tokenizer_dir", "convert_dir"):
        p = getattr(cfg, key)
        if p is not None and not p.is_absolute():
            updates[key] = (base_dir / p).resolve()
    return cfg.model_copy(update=updates)


def load_build_config(path: str | Path, overrides: dict[str, Path] | None = None) -> BuildConfig:
    """Read a build YAML; `overrides` (e.g. the CLI's --checkpoint / --output-dir) replace
    its path keys and are taken relative to the current directory, not the YAML's."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: build config not found")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: malformed YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    cfg = build_config_from_dict(raw, str(p), base_dir=p.parent.resolve())
    given = {k: Path(v).resolve() for k, v in (overrides or {}).items() if v is not None}
    return cfg.model_copy(update=given) if given else cfg
