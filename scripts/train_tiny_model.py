#!/usr/bin/env python3
"""Train the tiny Kimi-K2-architecture tool-calling model (kimi_trt/assets/tiny-kimi/).

Three steps, so the expensive one runs where the compute is and needs almost nothing there:

  prepare  (CPU, here)  corpus -> domain BPE vocabulary -> token ids + loss masks (.npz),
                        model config, teacher-forced eval set. Needs kimi_trt.
  train    (GPU or CPU) torch + transformers + numpy + safetensors only: DeepseekV3ForCausalLM
                        from the prepared config, AdamW, warmup + cosine LR over a wall-clock
                        budget, DeepSeek's aux-loss-free balancing of the router bias, loss on
                        assistant tokens only. Stops by itself inside --minutes (and on
                        SIGTERM), evaluates, and writes bf16 safetensors + train_log.json.
  score    (GPU or CPU) teacher-forced exact calls of candidate weights on the dev set.
  export   (CPU, here)  trained weights -> a checkpoint laid out exactly like Kimi-K2's
                        (block-FP8 + scales, BF16 embeddings/norms/router, fp32 bias,
                        tokenizer files), verified against transformers on the float weights.

    python scripts/train_tiny_model.py prepare --out .gpu_carry/tiny-kimi-data
    python scripts/train_tiny_model.py train --data .gpu_carry/tiny-kimi-data --out OUT --minutes 8
    python scripts/train_tiny_model.py export --data .gpu_carry/tiny-kimi-data --weights OUT \\
        --out kimi_trt/assets/tiny-kimi
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 15 * 2**20  # the device machine returns files of at most 16 MiB


class Corpus:
    """Token ids of all conversations (uint16, concatenated) with their loss masks.

    Most conversations open with the same tool declaration (~190 of ~270 tokens) and carry
    no loss there, so the corpus finds the prefixes that groups of conversations share;
    a batch is drawn from one group and its prefix is run once, not once per row."""

    def __init__(self, path: Path):
        z = np.load(path)
        self.tokens = z["tokens"]  # uint16; widened per batch
        self.offsets = z["offsets"]
        self.mask = np.unpackbits(z["mask_bits"])[: len(self.tokens)].astype(bool)
        self.lengths = np.diff(self.offsets)
        # (argument-begin id, call-end id): the span of a tool call's JSON arguments
        self.argument_span = tuple(int(i) for i in z["argument_span"])
        self.group, self.prefixes = self._shared_prefixes()

    def __len__(self) -> int:
        return len(self.lengths)

    def _shared_prefixes(self, key_len: int = 4) -> tuple[np.ndarray, list[np.ndarray]]:
        """(group id per conversation, each group's longest common prefix). Groups are keyed
        by their first tokens; a prefix never covers a loss-carrying target (it is prompt
        only) and leaves every member at least two tokens of its own."""
        starts = self.offsets[:-1]
        keys = np.stack([self.tokens[starts + i] for i in range(key_len)], axis=1)
        _, group = np.unique(keys, axis=0, return_inverse=True)
        group = group.reshape(-1)
        prefixes = []
        for g in range(int(group.max()) + 1):
            in_group = group == g
            members = starts[in_group]
            limit = int(self.lengths[in_group].min()) - 2
            n = 0
            while (
                n < limit
                and (self.tokens[members + n] == self.tokens[members[0] + n]).all()
                and not self.mask[members + n + 1].any()
            ):
                n += 1
            prefixes.append(self.tokens[members[0] : members[0] + n].astype(np.int64))
        return group, prefixes

    def epoch_batches(self, rng: np.random.Generator, batch_tokens: int) -> list[np.ndarray]:
        """Shuffled batches of one prefix group and similar length (little padding), each
        <= batch_tokens padded tokens after the shared prefix."""
        order = rng.permutation(len(self))
        suffix = self.lengths - np.array([len(p) for p in self.prefixes])[self.group]
        batches = []
        window = 256 * max(1, batch_tokens // int(suffix.mean()))
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.lexsort((suffix[chunk], self.group[chunk]))]
            i = 0
            while i < len(chunk):
                j = i + 1
                while (
                    j < len(chunk)
                    and self.group[chunk[j]] == self.group[chunk[i]]
                    and (j - i + 1) * suffix[chunk[j]] <= batch_tokens
                ):
                    j += 1
                batches.append(chunk[i:j])
                i = j
        rng.shuffle(batches)
        return batches

    def collate(self, idx: np.ndarray, copy_weight: float = 1.0) -> tuple[torch.Tensor, ...]:
        """(shared prefix [P], inputs [B,T] after it, labels [B,T] with -100 off the
        assistant turns, real lengths [B], loss weights [B,T]) for one group's rows.

        Targets that copy a token from earlier in the same dialogue (a name, a number: a
        token of the user turn or tool result that the shared prefix does not contain), and
        every target inside a tool call's arguments up to its end marker (values that are
        mapped, not copied: "pesos" -> MXN; where a name stops), weigh `copy_weight`; every
        other target weighs 1. These are the skills that are slow to appear; ~1 target in 2
        (the arguments' JSON keys and quotes included), ~1 in 8 without the in-call rule."""
        prefix = self.prefixes[int(self.group[idx[0]])]
        p = len(prefix)
        lengths = self.lengths[idx] - p
        width = int(lengths.max()) - 1
        inputs = np.zeros((len(idx), width), dtype=np.int64)
        labels = np.full((len(idx), width), -100, dtype=np.int64)
        weights = np.ones((len(idx), width), dtype=np.float32)
        in_prefix = np.zeros(2**16, dtype=bool)
        in_prefix[prefix] = True
        begin, end = self.argument_span
        for row, i in enumerate(idx):
            a, b = self.offsets[i] + p, self.offsets[i + 1]
            n = b - a - 1
            seq, target = self.tokens[a:b].astype(np.int64), self.mask[a + 1 : b]
            inputs[row, :n] = seq[:-1]
            labels[row, :n] = np.where(target, seq[1:], -100)
            if copy_weight != 1.0:  # where each token first appears outside assistant turns
                first_seen = np.full(int(seq.max()) + 1, len(seq), dtype=np.int64)
                shown = np.nonzero(~self.mask[a:b])[0]
                np.minimum.at(first_seen, seq[shown], shown)
                copies = target & (first_seen[seq[1:]] < np.arange(1, n + 1))
                in_call = (np.cumsum(seq == begin) - np.cumsum(seq == end))[:-1] > 0
                heavy = (copies & ~in_prefix[seq[1:]]) | (target & in_call)
                weights[row, :n] = np.where(heavy, copy_weight, 1.0)
        return (
            torch.from_numpy(prefix),
            torch.from_numpy(inputs),
            torch.from_numpy(labels),
            torch.from_numpy(lengths - 1),
            torch.from_numpy(weights),
        )


def routers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The noaux_tc routers (modules holding an e_score_correction_bias)."""
    return [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]


class RouterBalancer:
    """DeepSeek-V3's aux-loss-free balancing: after each step, raise the selection bias of
    under-loaded experts and lower it for over-loaded ones by `gamma` (sign of the error)."""

    def __init__(self, model: torch.nn.Module, gamma: float):
        self.gamma = gamma
        self.valid: torch.Tensor | None = None  # flattened [B*T] mask of real (non-pad) tokens
        self.routers = routers_of(model)
        self.counts: list[torch.Tensor | None] = [None] * len(self.routers)
        for k, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(k))

    def _hook(self, k: int):
        def record(module, args, output):
            if not module.training:
                return
            index = output[-1]
            if self.valid is not None:
                if len(self.valid) != len(index):
                    return  # the shared prompt prefix's pass: only the batch rows are counted
                index = index[self.valid]
            n = len(module.e_score_correction_bias)
            self.counts[k] = torch.bincount(index.reshape(-1), minlength=n).float()

        return record

    def update(self) -> None:
        """One bias step per router (stays on the device: no synchronisation)."""
        with torch.no_grad():
            for router, counts in zip(self.routers, self.counts, strict=True):
                if counts is not None:
                    mean = counts.mean().clamp(min=1.0)
                    router.e_score_correction_bias += self.gamma * torch.sign(mean - counts)

    def load_ratios(self) -> list[float]:
        """Each layer's max/mean expert load in the last step (1.0 = balanced)."""
        return [float(c.max() / c.mean().clamp(min=1.0)) for c in self.counts if c is not None]


def build_model(hf_config: dict, device: torch.device, attn: str, experts: str | None):
    """DeepseekV3ForCausalLM from the prepared config, checked to have Kimi's YaRN rope and
    softmax scale (a transformers release that ignored the rope fields would otherwise
    train a model the export describes wrongly)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in hf_config.items() if k != "expected_rope"}
    cfg = DeepseekV3Config(**fields)
    cfg._attn_implementation = attn
    if experts is not None:
        cfg._experts_implementation = experts
    cfg.use_cache = False
    model = DeepseekV3ForCausalLM(cfg).to(device)
    expected = hf_config.get("expected_rope")
    if expected is not None:
        inv_freq = model.model.rotary_emb.inv_freq.float().cpu()
        scale = model.model.layers[0].self_attn.scaling
        if not torch.allclose(inv_freq, torch.tensor(expected["inv_freq"]), rtol=1e-4) or not (
            math.isclose(scale, expected["softmax_scale"], rel_tol=1e-4)
        ):
            raise RuntimeError(
                f"this transformers builds a different rope/softmax scale than the config "
                f"(scale {scale} vs {expected['softmax_scale']}); refusing to train"
            )
    return model


def mirror_head_init(model: torch.nn.Module) -> None:
    """Start lm_head as a copy of the embedding matrix (still two separate weights, as in
    Kimi-K2, which does not tie them).

    Copying token t means the attended value of t must raise t's logit. With independent
    random embeddings and head there is no single attention map that does this for every
    token (2304 tokens, 256 dims), so the alignment is learned token by token, only for
    tokens seen as copy targets. With the head starting equal to the embeddings, an
    identity-like value/output map copies any token, including pieces of names never
    seen as targets."""
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)


def assistant_loss(
    model, prefix, inputs, labels, autocast, hide_prefix=False, weights=None
) -> torch.Tensor:
    """Cross-entropy on assistant tokens only; the head runs only where there is a target.

    The shared prefix runs once (batch 1) and its keys/values are broadcast to every row,
    so the gradient through it is the sum over rows, exactly as if each row carried it
    (tests/test_tiny_model.py checks the loss and gradients against the unshared model).
    `hide_prefix` leaves the prefix out but keeps every position where it would be: the
    copying curriculum (see `PrefixCurriculum`)."""
    with autocast():
        cache, positions = None, None
        if hide_prefix:
            positions = torch.arange(
                len(prefix), len(prefix) + inputs.shape[1], device=inputs.device
            )
            positions = positions[None].expand(len(inputs), -1)
        elif len(prefix):
            cache = model.model(input_ids=prefix[None], use_cache=True).past_key_values
            for layer in cache.layers:
                layer.keys = layer.keys.expand(len(inputs), -1, -1, -1)
                layer.values = layer.values.expand(len(inputs), -1, -1, -1)
        hidden = model.model(
            input_ids=inputs,
            position_ids=positions,
            use_cache=cache is not None,
            **{_cache_keyword(type(model.model)): cache},
        ).last_hidden_state
        keep = labels != -100
        logits = model.lm_head(hidden[keep])
    if weights is None:
        return F.cross_entropy(logits.float(), labels[keep])
    w = weights[keep]
    return (F.cross_entropy(logits.float(), labels[keep], reduction="none") * w).sum() / w.sum()


@functools.cache
def _cache_keyword(module_type: type) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache` (`past_key_values` is
    deprecated there); older releases, as a GPU machine may have, only know the old name.
    Looked up once per model class, not on every step."""
    params = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PrefixCurriculum:
    """Copying curriculum: early batches hide the shared tool-declaration prefix.

    Copying an argument means one attention head finding two or three name tokens among
    every key before it. With the ~190-token declaration in front, attention starts out
    spread over ~250 keys and the gradient that would sharpen it is ~4x weaker than over
    the ~60 tokens of the dialogue itself, so copying is slow to appear (0% after 58 min of
    CPU training with the prefix always present). Batches hide the prefix (positions kept)
    with a probability that falls linearly from 1 to 0 over the first `fraction` of the
    budget; afterwards every batch sees exactly what inference sees."""

    def __init__(self, fraction: float, t0: float, t_end: float, seed: int):
        self.t0, self.span = t0, max(1e-6, fraction * (t_end - t0))
        self.rng = np.random.default_rng(seed + 1)

    def hide(self, now: float) -> bool:
        return bool(self.rng.random() < 1.0 - (now - self.t0) / self.span)


def _autocast_for(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def choose_implementation(hf_config, device, corpus, batch_tokens, seed) -> tuple[str, str | None]:
    """The fastest (attention, experts) implementation that runs a training step here.

    Each candidate does one forward+backward on a real batch; the first that fails is skipped,
    so a transformers or torch build without grouped_mm / sdpa still trains (eagerly)."""
    if device.type != "cuda":
        return "sdpa", None
    autocast = _autocast_for(device)
    idx = corpus.epoch_batches(np.random.default_rng(seed), batch_tokens)[0]
    prefix, inputs, labels, _, _ = (t.to(device) for t in corpus.collate(idx))
    timings = {}
    # (batched_mm is left out: it gathers one weight copy per token, ~70 GB at this batch)
    for attn, experts in (("sdpa", "grouped_mm"), ("sdpa", None), ("eager", None)):
        try:
            torch.manual_seed(seed)
            model = build_model(hf_config, device, attn, experts)
            for _ in range(2):  # the second pass is timed (the first compiles kernels)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = assistant_loss(model, prefix, inputs, labels, autocast)
                loss.backward()
                torch.cuda.synchronize()
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            timings[(attn, experts)] = time.perf_counter() - t0
            print(
                f"[impl] attention={attn} experts={experts}: {timings[(attn, experts)] * 1e3:.1f} ms/step",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - any failure just rules the candidate out
            print(
                f"[impl] attention={attn} experts={experts}: unavailable ({type(e).__name__}: {str(e)[:120]})",
                flush=True,
            )
        finally:
            model = None
    if not timings:
        raise RuntimeError("no attention/experts implementation could run a training step")
    return min(timings, key=timings.get)


def teacher_forced_eval(model, eval_path: Path, device, autocast, limit: int = 0) -> dict:
    """Exact-call rate per split: greedy decoding reproduces the expected tool-call turn iff
    the argmax matches every expected token given the expected prefix, so one batched
    forward pass measures what greedy generation would produce. The per-token accuracy of
    the same turns shows progress before whole calls come out right."""
    z = np.load(eval_path)
    tokens, offsets, starts, splits = z["tokens"], z["offsets"], z["completion_starts"], z["splits"]
    names = [str(s) for s in z["split_names"]]
    cases = np.arange(len(starts))
    if limit and limit < len(cases):  # an evenly spread subset, every split kept
        cases = np.linspace(0, len(starts) - 1, limit).astype(int)
    hits, token_hits = {}, {}
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(cases), 64):
            chunk = cases[lo : lo + 64]
            seqs = [tokens[offsets[i] : offsets[i + 1]] for i in chunk]
            batch = np.zeros((len(seqs), max(len(q) for q in seqs)), dtype=np.int64)
            for row, q in enumerate(seqs):
                batch[row, : len(q)] = q
            with autocast():
                logits = model(input_ids=torch.from_numpy(batch).to(device)).logits
            pred = logits.argmax(-1).cpu().numpy()
            for row, i in enumerate(chunk):
                n, s = len(seqs[row]), int(starts[i])
                same = pred[row, s - 1 : n - 1] == batch[row, s:n]
                hits[int(i)], token_hits[int(i)] = bool(same.all()), float(same.mean())
    model.train()
    out: dict[str, dict[str, float]] = {"exact_call": {}, "token_accuracy": {}}
    for k, name in enumerate(names):
        members = [i for i in hits if splits[i] == k]
        if members:
            out["exact_call"][name] = sum(hits[i] for i in members) / len(members)
            out["token_accuracy"][name] = sum(token_hits[i] for i in members) / len(members)
    return out


def load_weights(model, weights_dirs: list[Path]) -> None:
    """Start from earlier train steps' weights (`save_weights` outputs; several: their
    uniform average, as `export --weights` ships it; fresh optimizer and schedule), so
    training can go on past one run's budget. The data must be tokenised with the same
    vocabulary (`prepare --vocab-from`); any other mismatch is refused by name. The mean is
    taken here rather than by kimi_trt's `average_states`: this step runs without kimi_trt."""
    from safetensors.torch import load_file

    own = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    states = []
    for weights_dir in weights_dirs:
        files = sorted(weights_dir.glob("weights-*.safetensors"))
        if not files:
            sys.exit(f"error: {weights_dir}: no weights-*.safetensors (a train step's --out)")
        saved = {k: v for f in files for k, v in load_file(str(f)).items()}
        for name in sorted(set(own) | set(saved)):
            if name not in saved or name not in own or saved[name].shape != own[name].shape:
                got = tuple(saved[name].shape) if name in saved else "absent"
                want = tuple(own[name].shape) if name in own else "absent"
                sys.exit(f"error: {weights_dir}: tensor {name}: saved {got}, this model {want}")
        states.append(saved)
    mean = {k: sum(s[k].float() for s in states) / len(states) for k in own}
    model.load_state_dict({k: mean[k].to(own[k].dtype) for k in own}, strict=False)


def save_weights(model, out: Path) -> list[str]:
    """bf16 matrices, fp32 vectors (router bias, norms), split into files the device can return."""
    from safetensors.torch import save_file

    state = {
        k: (v.detach().to(torch.bfloat16) if v.dim() >= 2 else v.detach().float())
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("inv_freq")
    }
    files, current, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if current and size + nbytes > MAX_FILE_BYTES:
            files.append(current)
            current, size = {}, 0
        current[k] = state[k]
        size += nbytes
    files.append(current)
    names = []
    for n, part in enumerate(files):
        name = f"weights-{n + 1:05d}-of-{len(files):05d}.safetensors"
        tmp = out / (name + ".partial")
        save_file(part, str(tmp))
        tmp.rename(out / name)
        names.append(name)
    for stale in out.glob("weights-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    return names


class Schedule:
    """Linear warmup over `warmup` steps, then cosine decay to `floor` x peak over the
    wall-clock budget (the run length is a time, not a step count)."""

    def __init__(self, peak: float, warmup: int, floor: float, t0: float, t_end: float):
        self.peak, self.warmup, self.floor, self.t0, self.t_end = peak, warmup, floor, t0, t_end

    def __call__(self, step: int, now: float) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        frac = min(1.0, (now - self.t0) / max(1e-6, self.t_end - self.t0))
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def _device(name: str, threads: int) -> torch.device:
    device = torch.device(
        name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return device


def _optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """AdamW, weight decay on matrices only; fused kernels on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda"
    )


def _step(model, opt, balancer, batch, lr, device, autocast, clip, hide) -> tuple:
    """One optimiser step on one batch; returns (loss, grad_norm, real tokens) without syncing."""
    prefix, inputs, labels, lengths, weights = batch
    prefix, inputs, labels, weights = (
        t.to(device, non_blocking=True) for t in (prefix, inputs, labels, weights)
    )
    positions = torch.arange(inputs.shape[1])
    balancer.valid = (positions[None, :] < lengths[:, None]).reshape(-1).to(device)
    for group in opt.param_groups:
        group["lr"] = lr
    loss = assistant_loss(model, prefix, inputs, labels, autocast, hide, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    balancer.update()
    return loss, grad_norm, int(lengths.sum())


def train(args: argparse.Namespace) -> None:
    """Train until the wall-clock budget (or SIGTERM), evaluating and saving every minute."""
    t_start = time.time()
    deadline = t_start + args.minutes * 60 - args.reserve_s
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    device = _device(args.device, args.threads)
    args.batch_tokens = args.batch_tokens or (65536 if device.type == "cuda" else 8192)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((data / "hf_config.json").read_text())
    corpus = Corpus(data / "corpus.npz")
    attn, experts = choose_implementation(hf_config, device, corpus, args.batch_tokens, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(hf_config, device, attn, experts).train()
    if args.init_weights:
        load_weights(model, [Path(w) for w in args.init_weights])
    elif args.mirror_head_init:
        mirror_head_init(model)
    if args.compile:
        model.model = torch.compile(model.model, dynamic=True)
    opt, balancer, autocast = (
        _optimizer(model, args, device),
        RouterBalancer(model, args.bias_gamma),
        _autocast_for(device),
    )
    t0 = time.time()
    sched = Schedule(args.lr, args.warmup, args.lr_floor, t0, deadline)
    curriculum = PrefixCurriculum(args.hide_prefix_fraction, t0, deadline, args.seed)
    rng = np.random.default_rng(args.seed)
    log = {
        "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
        "implementation": {"attention": attn, "experts": experts},
        "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": [],
        "evals": [],
    }
    print(f"[train] {log['parameters'] / 1e6:.2f}M params on {log['device']}, "
          f"{len(corpus)} conversations, budget {args.minutes} min", flush=True)  # fmt: skip
    step, tokens_seen, epoch, last_eval = 0, 0, 0, t0
    window = [0, t0]  # tokens and start time of the current logging window
    batches: list[np.ndarray] = []
    while time.time() < deadline and not stop["flag"]:
        if not batches:
            batches, epoch = corpus.epoch_batches(rng, args.batch_tokens), epoch + 1
        lr = sched(step, time.time())
        hide = curriculum.hide(time.time())
        batch = corpus.collate(batches.pop(), args.copy_weight)
        loss, grad_norm, n_tok = _step(
            model, opt, balancer, batch, lr, device, autocast, args.clip, hide
        )
        step, tokens_seen, window[0] = step + 1, tokens_seen + n_tok, window[0] + n_tok
        now = time.time()
        if now - window[1] >= args.log_every_s:
            entry = {"t": round(now - t0, 1), "step": step, "epoch": epoch, "loss": loss.item(),
                     "prefix_hidden": hide,
                     "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen,
                     "tokens_per_s": round(window[0] / (now - window[1])),
                     "max_expert_load": max(balancer.load_ratios())}  # fmt: skip
            log["history"].append(entry)
            print("[train] " + json.dumps(entry), flush=True)
            window = [0, now]
        if now - last_eval >= args.eval_every_s and now + 30 < deadline:
            _evaluate_and_save(model, data, out, device, autocast, log, step, t0)
            last_eval = time.time()
    log["stopped_by"] = "signal" if stop["flag"] else "time budget"
    log["train_seconds"] = round(time.time() - t0, 1)
    log["steps"], log["tokens_seen"] = step, tokens_seen
    log["tokens_per_s"] = round(tokens_seen / max(1e-6, time.time() - t0))
    _evaluate_and_save(model, data, out, device, autocast, log, step, t0)
    print(f"[train] done: {step} steps, {tokens_seen} tokens, {log['tokens_per_s']} tok/s, "
          f"wall {time.time() - t_start:.0f}s", flush=True)  # fmt: skip


def _evaluate_and_save(model, data, out, device, autocast, log, step, t0) -> None:
    scores = teacher_forced_eval(
        model, data / "eval.npz", device, autocast, log["args"]["eval_cases"]
    )
    if (data / "dev.npz").is_file():  # data prepared before dev sets existed has none
        scores["dev"] = teacher_forced_eval(model, data / "dev.npz", device, autocast)
    log["evals"].append({"t": round(time.time() - t0, 1), "step": step, **scores})
    print("[eval] " + json.dumps(log["evals"][-1]), flush=True)
    log["weights"] = save_weights(model, out)
    biases = [r.e_score_correction_bias.abs().max().item() for r in routers_of(model)]
    log["router_bias_max_abs"] = biases
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def score(args: argparse.Namespace) -> None:
    """Teacher-forced exact calls of candidate weights (one train output, or the average of
    several) on a data folder's dev set: the figure to choose a candidate by, so that the
    eval's held-out values and unseen phrasings stay out of the choice."""
    device = _device(args.device, args.threads)
    data = Path(args.data)
    if not (data / f"{args.set}.npz").is_file():
        sys.exit(f"error: {data}: no {args.set}.npz (run prepare with this version first)")
    model = build_model(json.loads((data / "hf_config.json").read_text()), device, "sdpa", None)
    load_weights(model, [Path(w) for w in args.weights])
    scores = teacher_forced_eval(model, data / f"{args.set}.npz", device, _autocast_for(device))
    print(json.dumps({"weights": args.weights, "set": args.set, **scores}))


def _kimi_trt_step(name: str):
    sys.path.insert(0, str(REPO))
    from kimi_trt.testing import tiny_model

    return getattr(tiny_model, name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="step", required=True)
    pr = sub.add_parser("prepare", help="corpus, vocabulary, token ids, config, eval set (CPU)")
    pr.add_argument("--out", required=True, help="data folder (carry it to the GPU machine)")
    pr.add_argument("--conversations", type=int, default=120_000)
    pr.add_argument("--vocab-size", type=int, default=2048, help="base BPE size (+256 specials)")
    pr.add_argument(
        "--vocab-sample", type=int, default=4000, help="conversations the BPE is trained on"
    )
    pr.add_argument(
        "--vocab-from",
        help="reuse this vocabulary (a data folder's vocab/ or a checkpoint) instead of training one",
    )
    pr.add_argument("--layers", type=int, default=3)
    pr.add_argument("--experts", type=int, default=8)
    pr.add_argument("--seed", type=int, default=0)
    tr = sub.add_parser("train", help="train for a wall-clock budget (torch + transformers only)")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument(
        "--minutes", type=float, required=True, help="whole run, setup and save included"
    )
    tr.add_argument("--reserve-s", type=float, default=25.0, help="kept for the final eval + save")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    tr.add_argument(
        "--batch-tokens", type=int, help="padded tokens per step [65536 on CUDA, 8192 on CPU]"
    )
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--lr-floor", type=float, default=0.05)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--weight-decay", type=float, default=0.05)
    tr.add_argument("--clip", type=float, default=1.0)
    tr.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias step per update")
    tr.add_argument(
        "--hide-prefix-fraction",
        type=float,
        default=0.5,
        help="share of the budget over which batches stop hiding the shared prompt prefix",
    )
    tr.add_argument(
        "--mirror-head-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start lm_head equal to the embeddings (see mirror_head_init)",
    )
    tr.add_argument(
        "--init-weights",
        nargs="+",
        help="continue from this earlier train --out (several: their average; same "
        "vocabulary; replaces --mirror-head-init)",
    )
    tr.add_argument(
        "--copy-weight",
        type=float,
        default=4.0,
        help="loss weight of targets copied from earlier in the dialogue (see Corpus.collate)",
    )
    tr.add_argument("--log-every-s", type=float, default=10.0)
    tr.add_argument("--eval-every-s", type=float, default=60.0)
    tr.add_argument(
        "--eval-cases", type=int, default=0, help="teacher-forced eval subset (0: all 300)"
    )
    tr.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder (off by default)"
    )
    tr.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser(
        "score", help="teacher-forced exact calls of candidate weights on the dev set"
    )
    sc.add_argument("--data", required=True)
    sc.add_argument(
        "--weights", required=True, nargs="+", help="train output(s); several: their average"
    )
    sc.add_argument("--set", choices=("dev", "eval"), default="dev")
    sc.add_argument("--device", default="auto")
    sc.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ex = sub.add_parser("export", help="write the Kimi-K2-format checkpoint (CPU)")
    ex.add_argument("--data", required=True)
    ex.add_argument(
        "--weights",
        required=True,
        nargs="+",
        help="folder with the train step's outputs (several: their weights' uniform average)",
    )
    ex.add_argument("--out", required=True)
    ex.add_argument(
        "--report",
        default=str(REPO / "bench" / "results" / "tiny_model_export.json"),
        help="where to write the FP8-vs-float comparison",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step == "train":
        train(args)
        return
    if args.step == "score":
        score(args)
        return
    step = _kimi_trt_step(args.step)
    from kimi_trt.errors import UserError

    try:
        step(args)
    except UserError as e:  # a wrong folder or file: one line, the CLI's exit code (2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
