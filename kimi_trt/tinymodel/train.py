"""The train and score steps of the tiny model: torch + transformers + numpy + safetensors only.

`train`: DeepseekV3ForCausalLM from the prepared config, AdamW, warmup + cosine LR over a
wall-clock budget, DeepSeek's aux-loss-free balancing of the router bias, loss on assistant
tokens only (copied values weighted up); stops by itself inside --minutes (and on SIGTERM),
evaluates teacher-forced, and writes bf16 safetensors + train_log.json. `score`: the
teacher-forced exact-call figure of candidate weights on the dev set (what a release is
chosen by). Nothing here imports the rest of kimi_trt.
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

from kimi_trt.tinymodel.batches import Corpus, PrefixCurriculum

MAX_FILE_BYTES = 15 * 2**20  # the device machine returns files of at most 16 MiB


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
    max_steps = args.max_steps or math.inf
    while time.time() < deadline and step < max_steps and not stop["flag"]:
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
    log["stopped_by"] = (
        "signal" if stop["flag"] else "max steps" if step >= max_steps else "time budget"
    )
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
