"""The torch executor: runs one rank's share of Kimi-K2 from its per-rank checkpoint file.

All ranks execute the same `StepPlan` (broadcast by rank 0) in lockstep. What a rank
computes, and which collective joins the shares, follows the checkpoint's Mapping:

* attention TP (attn_tp = tp): every rank sees every sequence, holds hl = h/tp heads;
  `dense`, the dense MLP, and MoE (routed experts + shared expert) outputs are partial
  sums -> one all-reduce each. Embedding and lm_head are vocab shards: lookups
  all-reduce, logits all-gather along the vocab.
* attention DP: rank r owns the sequences in slots s with s % world == r and runs whole
  attention, dense MLP and shared expert on them alone; for routed experts (still split
  over EP x moe_tp) the tokens of all ranks are gathered, each rank adds its experts'
  share, and the sum is scattered back to the owners. Logits are gathered by rows.

Attention caches only the MLA latent per token and layer: c (kv_lora_rank values, after
kv_a_layernorm) and the rotated k_pe (qk_rope_head_dim), never per-head K/V, in a pool of
fixed-size blocks (runtime/kv_blocks.py keeps the tables on rank 0). Prompt tokens use the
unabsorbed projections (q_b_proj, kv_b_proj): over their own tokens when the prompt
starts at position 0, over the up-projected cached latents too when it continues one (a
later prefill chunk, the rest of a prompt after a prefix-cache hit). Decode uses the
absorbed ones (fused_q_proj for q, kv_b_proj's v rows after attention) over the cache, as
the TensorRT-LLM kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kimi_trt.convert.rank_checkpoint import RankCheckpointConfig
from kimi_trt.plugins.router import route
from kimi_trt.runtime import layers as L
from kimi_trt.runtime.comm import Comm
from kimi_trt.runtime.weights import load_rank_weights


@dataclass(frozen=True)
class StepPlan:
    """One forward step over a set of sequences (the same object on every rank).

    Entry i puts `tokens[i]` at positions starts[i].. of the sequence seated in `slots[i]`
    (the seat decides the attention-DP owner), whose latents live in the owner's pool
    blocks `blocks[i]` (position p in block blocks[i][p // block_size]); the table covers
    every position up to the entry's last token. Entries of one step may mix whole
    prompts, prompt chunks and generated tokens; `decode[i]` marks a generated token
    (absorbed attention), the others are prompt tokens (unabsorbed, whatever their
    count). Logits come back for the last token of each entry, or every token if
    `all_logits`.
    """

    slots: list[int]
    tokens: list[list[int]]
    starts: list[int]
    blocks: list[list[int]]
    decode: list[bool]
    all_logits: bool = False


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: L.AttentionWeights
    kind: str  # "dense" | "moe"
    mlp: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Group:
    """Entries of a batch that attend alike: `rows` index the packed tokens."""

    rows: torch.Tensor  # [n] packed token rows of the group's entries, in entry order
    lens: list[int]  # tokens per entry
    positions: torch.Tensor  # [n]
    tables: torch.Tensor | None = None  # [entries, blocks] (cached groups; padded with 0)


@dataclass
class _Batch:
    """This rank's share of a plan, packed token-major, with its attention groups."""

    entries: list[int]  # indices into the plan
    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    token_blocks: torch.Tensor  # [N] cache block of each token
    token_offsets: torch.Tensor  # [N] row inside that block
    seq_lens: list[int]
    fresh: _Group | None  # entries starting at position 0: attend among their own tokens
    decode: _Group | None  # one-token entries over the cache, batched (absorbed)
    extend: list[_Group]  # multi-token entries over the cache, one group each (unabsorbed)


class TorchExecutor:
    """One rank's weights, latent KV cache and forward step."""

    def __init__(
        self,
        cfg: RankCheckpointConfig,
        comm: Comm,
        dtype: torch.dtype,
        max_seq_len: int,
        progress: bool = False,
        verify_checksum: bool = True,
    ):
        self.cfg = cfg
        self.model = cfg.model
        self.mapping = cfg.mapping
        self.comm = comm
        self.rank = comm.rank
        self.device = comm.device
        self.dtype = dtype
        self.dp = cfg.mapping.attention_dp and comm.world_size > 1
        w = load_rank_weights(cfg, self.rank, dtype, self.device, progress, verify_checksum)
        self.layers = [self._layer(w, i) for i in range(self.model.num_hidden_layers)]
        self.embed = w["transformer.vocab_embedding.weight"]
        self.ln_f = w["transformer.ln_f.weight"]
        self.lm_head = w["lm_head.weight"]
        m = self.model
        self.dims = L.MlaDims(
            heads=m.num_attention_heads // cfg.mapping.attn_tp_size,
            q_lora=m.q_lora_rank or 0,
            kv_lora=m.kv_lora_rank,
            nope=m.qk_nope_head_dim,
            rope=m.qk_rope_head_dim,
            v=m.v_head_dim,
            scale=m.softmax_scale,
            eps=m.rms_norm_eps,
        )
        self.rope = L.Rope(
            m.rope_inv_freq(), m.rope_attention_factor, max_seq_len, dtype, self.device
        )
        self.first_expert = self.mapping.experts_of(self.rank, m.n_routed_experts).start
        self.cache: torch.Tensor | None = None  # [layers, blocks, block_size, kl + rope]

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"transformer.layers.{i}."
        lora = self.model.q_lora_rank is not None
        attn = L.AttentionWeights(
            fused_a=w[p + "attention.fused_a.weight"],
            q_a_norm=w[p + "attention.q_a_layernorm.weight"] if lora else None,
            kv_a_norm=w[p + "attention.kv_a_layernorm.weight"],
            q_b=w[p + ("attention.q_b_proj.weight" if lora else "attention.q_proj.weight")],
            kv_b=w[p + "attention.kv_b_proj.weight"],
            fused_q=w[p + "attention.fused_q_proj"],
            dense=w[p + "attention.dense.weight"],
        )
        kind = self.model.layer_kinds[i]
        names = ("fc", "gate", "proj") if kind == "dense" else ("fc", "proj")
        mlp = {n: w[f"{p}mlp.{n}.weight"] for n in names}
        if kind == "moe":
            mlp["router"] = w[p + "mlp.router.weight"]
            mlp["bias"] = w[p + "mlp.e_score_correction_bias"]
            if self.model.n_shared_experts:
                mlp["shared_fc"] = w[p + "mlp.shared_expert.fc.weight"]
                mlp["shared_proj"] = w[p + "mlp.shared_expert.proj.weight"]
        return LayerWeights(
            w[p + "input_layernorm.weight"], w[p + "post_layernorm.weight"], attn, kind, mlp
        )

    # ---- cache and ownership ---------------------------------------------------------
    def owner(self, slot: int) -> int | None:
        """The rank that runs attention for `slot` (None: every rank, attention TP)."""
        return slot % self.comm.world_size if self.dp else None

    def ensure_cache(self, n_blocks: int, block_size: int) -> None:
        """Allocate this rank's latent pool: `n_blocks` blocks of `block_size` tokens (kept
        while the shape stays; the pool's contents belong to rank 0's block tables)."""
        width = self.dims.kv_lora + self.dims.rope
        shape = (self.model.num_hidden_layers, n_blocks, block_size, width)
        if self.cache is not None and tuple(self.cache.shape) == shape:
            return
        self.cache = None
        self.cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def release_cache(self) -> None:
        self.cache = None

    # ---- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: StepPlan) -> torch.Tensor | None:
        """Run `plan`; rank 0 gets float32 logits [rows, vocab_size] in plan order."""
        batch = self._pack(plan)
        counts = self._token_counts(plan)
        x = self._embed(batch.tokens)
        for i, layer in enumerate(self.layers):
            h = L.rms_norm(x, layer.input_norm, self.dims.eps)
            x = x + self._attention(i, layer, h, batch)
            h = L.rms_norm(x, layer.post_norm, self.dims.eps)
            x = x + self._ffn(layer, h, counts)
        if not plan.all_logits:
            last = torch.tensor(batch.seq_lens, dtype=torch.int64, device=self.device).cumsum(0) - 1
            x = x[last]
        x = L.rms_norm(x, self.ln_f, self.dims.eps)
        return self._logits(x, plan)

    def _entries_of(self, plan: StepPlan, rank: int | None) -> list[int]:
        return [
            i for i, s in enumerate(plan.slots) if rank is None or self.owner(s) in (None, rank)
        ]

    def _pack(self, plan: StepPlan) -> _Batch:
        entries = self._entries_of(plan, self.rank)
        tokens, positions, blocks, offsets, lens = [], [], [], [], []
        fresh, decode, extend = [], [], []
        bs = self.cache.shape[2]
        for i in entries:
            n, start, table = len(plan.tokens[i]), plan.starts[i], plan.blocks[i]
            rows = list(range(len(tokens), len(tokens) + n))
            span = range(start, start + n)
            tokens += plan.tokens[i]
            positions += span
            blocks += [table[p // bs] for p in span]
            offsets += [p % bs for p in span]
            lens.append(n)
            group = decode if plan.decode[i] else fresh if start == 0 else extend
            group.append((rows, n, table))

        def t(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        pos = t(positions)

        def make(members, cached: bool) -> _Group | None:
            if not members:
                return None
            rows = t([r for m in members for r in m[0]])
            tables = None
            if cached:
                width = max(len(m[2]) for m in members)
                tables = t([m[2] + [0] * (width - len(m[2])) for m in members])
            return _Group(rows, [m[1] for m in members], pos[rows], tables)

        return _Batch(
            entries=entries,
            tokens=t(tokens),
            positions=pos,
            token_blocks=t(blocks),
            token_offsets=t(offsets),
            seq_lens=lens,
            fresh=make(fresh, False),
            decode=make(decode, True),
            extend=[make([m], True) for m in extend],
        )

    def _token_counts(self, plan: StepPlan) -> list[int]:
        """Tokens each rank holds in this step (attention DP only; all ranks compute the same)."""
        if not self.dp:
            return []
        return [
            sum(len(plan.tokens[i]) for i in self._entries_of(plan, r))
            for r in range(self.comm.world_size)
        ]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.mapping.attn_tp_size
        if t == 1 or self.dp:
            return self.embed[tokens]
        rows = self.embed.shape[0]
        local = tokens - self.mapping.attn_tp_rank(self.rank) * rows
        inside = (local >= 0) & (local < rows)
        x = self.embed[local.clamp(0, rows - 1)] * inside[:, None].to(self.dtype)
        return self.comm.all_reduce(x)

    def _attention(self, li: int, layer: LayerWeights, h: torch.Tensor, b: _Batch) -> torch.Tensor:
        d = self.dims
        if h.shape[0] == 0:
            return torch.zeros_like(h)
        cq, latent = L.mla_latent(h, layer.attn, d, self.rope, b.positions)
        cache = self.cache[li]
        cache[b.token_blocks, b.token_offsets] = latent
        o = torch.empty(h.shape[0], d.heads * d.v, dtype=h.dtype, device=h.device)
        if b.fresh is not None:
            g = b.fresh
            o[g.rows] = L.mla_prefill(
                cq[g.rows], latent[g.rows], layer.attn, d, self.rope, g.positions, g.lens
            )
        if b.decode is not None:
            g = b.decode
            ctx = cache[g.tables].flatten(1, 2)  # [entries, blocks * block_size, width]
            o[g.rows] = L.mla_decode(cq[g.rows], ctx, layer.attn, d, self.rope, g.positions)
        for g in b.extend:
            ctx = cache[g.tables[0]].flatten(0, 1)  # [blocks * block_size, width]
            o[g.rows] = L.mla_extend(cq[g.rows], ctx, layer.attn, d, self.rope, g.positions)
        out = o @ layer.attn.dense.T
        if not self.dp and self.mapping.attn_tp_size > 1:
            self.comm.all_reduce(out)
        return out

    def _route(self, x: torch.Tensor, mlp: dict[str, torch.Tensor]):
        m = self.model
        logits = x.to(torch.float32) @ mlp["router"].T
        return route(
            logits,
            mlp["bias"],
            top_k=m.num_experts_per_tok,
            n_group=m.n_group,
            topk_group=m.topk_group,
            routed_scaling_factor=m.routed_scaling_factor,
            norm_topk_prob=m.norm_topk_prob,
        )

    def _ffn(self, layer: LayerWeights, h: torch.Tensor, counts: list[int]) -> torch.Tensor:
        mlp = layer.mlp
        if layer.kind == "dense":
            out = L.dense_mlp(h, mlp["fc"], mlp["gate"], mlp["proj"])
            return out if self.dp else self.comm.all_reduce(out)
        shared = L.swiglu(h, mlp["shared_fc"], mlp["shared_proj"]) if "shared_fc" in mlp else 0
        if not self.dp:
            ids, weights = self._route(h, mlp)
            out = L.routed_experts(h, ids, weights, mlp["fc"], mlp["proj"], self.first_expert)
            return self.comm.all_reduce(out + shared)
        everyone = self.comm.all_gather_rows(h, counts)
        ids, weights = self._route(everyone, mlp)
        routed = L.routed_experts(everyone, ids, weights, mlp["fc"], mlp["proj"], self.first_expert)
        return self.comm.reduce_scatter_rows(routed, counts) + shared

    def _logits(self, x: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        local = (x @ self.lm_head.T).to(torch.float32)
        if not self.dp:
            full = self.comm.all_gather(local, dim=-1)
        else:
            full = self._gather_dp_rows(local, plan)
        return full[:, : self.model.vocab_size] if self.rank == 0 else None

    def _gather_dp_rows(self, local: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Rows of all ranks (grouped by rank), put back into plan order."""
        world = self.comm.world_size
        per_entry = [len(t) if plan.all_logits else 1 for t in plan.tokens]
        by_rank = [self._entries_of(plan, r) for r in range(world)]
        counts = [sum(per_entry[i] for i in entries) for entries in by_rank]
        gathered = self.comm.all_gather_rows(local, counts)
        starts, offset = {}, 0
        for entries in by_rank:
            for i in entries:
                starts[i] = offset
                offset += per_entry[i]
        order = [starts[i] + j for i in range(len(plan.slots)) for j in range(per_entry[i])]
        return gathered[torch.tensor(order, dtype=torch.int64, device=self.device)]
