"""Rank decomposition with TensorRT-LLM's `Mapping` semantics (tensorrt_llm/mapping.py).

world = tp * pp (pp fixed at 1); tp = moe_tp * moe_ep; tp_rank = rank % tp;
moe_tp_rank = tp_rank // moe_ep; moe_ep_rank = tp_rank % moe_ep. EP rank r owns the
contiguous experts [r*E/ep, (r+1)*E/ep). With attention DP every rank keeps the whole
attention (and dense MLP) and serves its own requests.

`layout_problems` is the single place that decides whether a (model, layout) pair can be
split: every share must be equal (heads, experts, intermediate sizes divisible). FP8 block
alignment is not a layout condition: the converter requantises a tensor whose share
boundary falls inside a block (kimi_trt/convert/units.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_trt.config import ModelConfig, Parallelism
from kimi_trt.errors import ConfigError


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    tp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1
    attention_dp: bool = False
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.moe_tp_size * self.moe_ep_size != self.tp_size:
            raise ConfigError(
                f"moe_tp ({self.moe_tp_size}) x moe_ep ({self.moe_ep_size}) must equal tp ({self.tp_size})"
            )
        if self.tp_size * self.pp_size != self.world_size:
            raise ConfigError(
                f"tp ({self.tp_size}) x pp ({self.pp_size}) must equal world_size ({self.world_size})"
            )

    @classmethod
    def from_parallelism(cls, p: Parallelism) -> Mapping:
        return cls(
            world_size=p.world_size,
            tp_size=p.tp,
            moe_tp_size=p.moe_tp,
            moe_ep_size=p.ep,
            attention_dp=p.attention_dp,
            pp_size=p.pp,
        )

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def moe_tp_rank(self, rank: int) -> int:
        return self.tp_rank(rank) // self.moe_ep_size

    def moe_ep_rank(self, rank: int) -> int:
        return self.tp_rank(rank) % self.moe_ep_size

    @property
    def attn_tp_size(self) -> int:
        """Ways attention heads (and dense MLPs) are split: 1 under attention DP."""
        return 1 if self.attention_dp else self.tp_size

    def attn_tp_rank(self, rank: int) -> int:
        return 0 if self.attention_dp else self.tp_rank(rank)

    def experts_of(self, rank: int, n_experts: int) -> range:
        """The contiguous block of global expert ids owned by `rank`."""
        per = n_experts // self.moe_ep_size
        start = self.moe_ep_rank(rank) * per
        return range(start, start + per)

    def to_trtllm_dict(self) -> dict[str, int | bool]:
        """The `mapping` object of a TensorRT-LLM checkpoint config.json."""
        return {
            "world_size": self.world_size,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "moe_tp_size": self.moe_tp_size,
            "moe_ep_size": self.moe_ep_size,
            "attn_tp_size": self.attn_tp_size,
            "attn_cp_size": 1,
            "cp_size": 1,
            "enable_attention_dp": self.attention_dp,
        }

    @classmethod
    def from_trtllm_dict(cls, d: dict) -> Mapping:
        return cls(
            world_size=int(d["world_size"]),
            tp_size=int(d["tp_size"]),
            moe_tp_size=int(d.get("moe_tp_size", 1)),
            moe_ep_size=int(d.get("moe_ep_size", 1)),
            attention_dp=bool(d.get("enable_attention_dp", False)),
            pp_size=int(d.get("pp_size", 1)),
        )


def _split_problem(what: str, size: int, ways: int, group: str) -> str | None:
    if ways == 1 or size % ways == 0:
        return None
    return f"{what}={size} is not divisible by {ways} ({group})"


def layout_problems(model: ModelConfig, m: Mapping) -> list[str]:
    """Every reason this model cannot be split this way (empty list: it can).

    Only divisibility: every rank holds an equal share. Where a share boundary falls inside
    an FP8 block, the converter requantises that tensor (kimi_trt/convert/units.py), so
    block alignment is not a layout condition. The vocab need not divide: it is padded.
    """
    t = m.attn_tp_size
    attn = "attention-TP ranks; --attention-dp keeps them whole on every rank"
    checks = [
        _split_problem("num_attention_heads", model.num_attention_heads, t, attn),
        _split_problem("intermediate_size (dense MLP)", model.intermediate_size, t, attn),
    ]
    if model.n_routed_experts:
        checks += [
            _split_problem("n_routed_experts", model.n_routed_experts, m.moe_ep_size, "EP ranks"),
            _split_problem(
                "moe_intermediate_size", model.moe_intermediate_size, m.moe_tp_size, "MoE-TP ranks"
            ),
            _split_problem(
                "shared expert intermediate (moe_intermediate_size x n_shared_experts)",
                model.moe_intermediate_size * model.n_shared_experts,
                t,
                attn,
            ),
        ]
    return [c for c in checks if c]


def check_layout(model: ModelConfig, m: Mapping) -> None:
    problems = layout_problems(model, m)
    if problems:
        raise ConfigError(
            f"layout tp={m.tp_size} ep={m.moe_ep_size} moe_tp={m.moe_tp_size}"
            f"{' attention_dp' if m.attention_dp else ''} does not fit the model: "
            + "; ".join(problems)
        )
