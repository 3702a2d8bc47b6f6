"""The tiny tool-calling model: corpus properties, prepare -> train -> export on CPU, the
eval's judging, and (when committed) the trained asset itself."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi_trt.chat.kimi_format import ARGUMENT_BEGIN, CALL_END
from kimi_trt.chat.template import render_chat
from kimi_trt.chat.tokenizer import KimiTokenizer
from kimi_trt.config import load_model_config
from kimi_trt.convert.fp8 import FP8_DTYPE
from kimi_trt.mapping import layout_problems
from kimi_trt.tinymodel import export, prepare, train
from kimi_trt.tinymodel.batches import Corpus
from kimi_trt.tinymodel.catalogue import (
    DEV_CITIES,
    HELDOUT_AMOUNTS,
    HELDOUT_CITIES,
    HELDOUT_OPERANDS,
    HELDOUT_VALUE_COUNT,
    TRAIN_CITIES,
    ToolArgumentError,
    run_tool,
)
from kimi_trt.tinymodel.corpus import (
    COMPOSED_PHRASINGS,
    DEV_PHRASINGS,
    EVAL_PHRASINGS,
    TRAIN_PHRASINGS,
    dev_cases,
    eval_cases,
    training_conversations,
)
from kimi_trt.tinymodel.dialogues import DEFAULT_CHECKPOINT, run_dialogues, summarise
from kimi_trt.torch_bridge import torch_dtype

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = [sys.executable, str(REPO / "scripts" / "train_tiny_model.py")]
SMALL_VOCAB = REPO / "kimi_trt" / "assets" / "small-vocab"


def _rendered(n: int, seed: int = 0) -> list[str]:
    return [
        render_chat(c.messages, tools=c.tools, add_generation_prompt=False)
        for c in training_conversations(seed, n)
    ]


def test_corpus_is_deterministic_and_never_shows_heldout_values():
    convs = list(training_conversations(0, 3000))
    texts = _rendered(3000)
    assert texts == _rendered(3000) and texts[:50] != _rendered(50, seed=1)
    assert HELDOUT_VALUE_COUNT == 100 and not set(HELDOUT_CITIES) & set(TRAIN_CITIES)
    assert not set(DEV_CITIES) & (set(HELDOUT_CITIES) | set(TRAIN_CITIES))
    corpus = "\n".join(texts)
    words = set(re.findall(r"[A-Za-z]+", corpus))
    for city in HELDOUT_CITIES + DEV_CITIES:
        assert not set(city.split()) <= words, city
    heldout_numbers = set(HELDOUT_AMOUNTS) | {a for a, _ in HELDOUT_OPERANDS}
    for conv in convs:
        for m in conv.messages:
            for call in m.get("tool_calls", []):
                args = json.loads(call["function"]["arguments"])
                used = {args.get("amount")} | {
                    int(x) for x in re.findall(r"\d+", args.get("expression", ""))
                }
                assert not used & heldout_numbers, args
    users = {m["content"] for c in convs for m in c.messages if m["role"] == "user"}
    for phrasings in EVAL_PHRASINGS.values():
        for p in phrasings:
            pattern = re.compile(".+".join(map(re.escape, re.split(r"\{\w+\}", p))))
            assert not any(pattern.fullmatch(u) for u in users), p


def _four_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\{\w+\}|[a-z']+", text.lower())
    return {tuple(words[i : i + 4]) for i in range(len(words) - 3)}


def _grams_of(*tables: dict[str, tuple[str, ...]]) -> set[tuple[str, ...]]:
    return set().union(*(_four_grams(p) for table in tables for ps in table.values() for p in ps))


def test_composed_phrasings_share_no_four_words_with_the_eval():
    """The composed training sentences teach the vocabulary of each tool; the eval must still
    see phrasings never seen in training, so no composed sentence shares a run of four
    words (placeholders included) with an eval sentence of any tool."""
    eval_grams = _grams_of(EVAL_PHRASINGS)
    for tool, phrasings in COMPOSED_PHRASINGS.items():
        assert len(set(phrasings)) == len(phrasings) >= 30, tool
        for p in phrasings:
            assert not _four_grams(p) & eval_grams, p


def test_dev_cases_use_neither_training_nor_eval_phrasings_or_values():
    """Candidates are chosen on dev_cases, so they must stand apart from the eval (no four
    words in common with its phrasings, none of its held-out values) and from training
    (phrasings as above; development cities are refused as invented names, checked in the
    corpus test)."""
    seen = _grams_of(EVAL_PHRASINGS, TRAIN_PHRASINGS, COMPOSED_PHRASINGS)
    for p in (p for ps in DEV_PHRASINGS.values() for p in ps):
        assert not _four_grams(p) & seen, p
    cases = dev_cases()
    assert cases == dev_cases() and len(cases) == 130
    cities = [c.expected_args["city"] for c in cases if c.split == "dev_cities"]
    assert cities == DEV_CITIES
    eval_prompts = {c.messages[0]["content"] for c in eval_cases()}
    assert not eval_prompts & {c.messages[0]["content"] for c in cases}


def test_training_answers_restate_the_tool_result():
    tool_convs = [
        c
        for c in training_conversations(3, 400)
        if c.kind in ("get_weather", "calculate", "convert_currency")
    ]
    assert len(tool_convs) > 200
    for conv in tool_convs:
        call = conv.messages[-3]["tool_calls"][0]
        assert call["id"] == f"functions.{call['function']['name']}:0"
        outcome = run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
        assert conv.messages[-2]["content"] == outcome.content
        assert all(fact in conv.messages[-1]["content"] for fact in outcome.facts)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        (
            "convert_currency",
            {"amount": int("9" * 400), "from_currency": "USD", "to_currency": "EUR"},
        ),
        ("convert_currency", {"amount": [1], "from_currency": "USD", "to_currency": "EUR"}),
        ("convert_currency", {"amount": 5, "from_currency": "XYZ", "to_currency": "EUR"}),
        ("calculate", {"expression": "2 ** 8"}),
        ("calculate", {"expression": "9" * 5000 + " + 1"}),
        ("get_weather", {"town": "Paris"}),
        ("get_time", {}),
    ],
)
def test_tool_rejects_what_a_model_may_emit_with_one_error_type(name, args):
    """Eval, demo and serving test turn ToolArgumentError into an error result; any other
    exception (the float overflow that once crashed the eval under mpirun) would abort them."""
    with pytest.raises(ToolArgumentError, match=name):
        run_tool(name, args)


def test_loss_mask_covers_exactly_the_assistant_turns():
    tok = KimiTokenizer.from_dir(SMALL_VOCAB)
    for conv in training_conversations(5, 40):
        ids, mask = prepare.conversation_ids(conv, tok, tok.chat_template)
        full = render_chat(conv.messages, tools=conv.tools, add_generation_prompt=False)
        assert tok.decode(ids) == full
        target = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        replies = [m for m in conv.messages if m["role"] == "assistant"]
        assert target.count("<|im_end|>") == len(replies)
        for reply in replies:
            assert reply["content"] in target
            for call in reply.get("tool_calls", []):
                assert call["function"]["arguments"] in target
        assert "<|im_user|>" not in target and "## Return of" not in target


def test_tiny_config_splits_for_tp2_ep2_layouts():
    cfg = prepare.tiny_model_config(2304, 2048, layers=4, experts=8)
    assert cfg.hidden_size % 128 == 0 and cfg.layer_kinds[0] == "dense"
    assert cfg.rope_scaling is not None and list(cfg.weight_block_size) == [128, 128]
    for m in prepare.REQUIRED_LAYOUTS:
        assert layout_problems(cfg, m) == []


@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="tiny-kimi asset not trained yet"
)
def test_tiny_config_keeps_the_shipped_models_rope():
    """prepare takes its YaRN from convert.synth (TINY_ROPE_SCALING): a change there must
    not silently give a retrained tiny model another rope than the shipped one."""
    cfg = prepare.tiny_model_config(2304, 2048, layers=4, experts=8)
    assert cfg.rope_scaling == load_model_config(DEFAULT_CHECKPOINT).rope_scaling


def run_script(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run one of our scripts; on failure the assertion carries the tail of its stderr
    (CI shows only the test's own output, so a bare CalledProcessError would hide why)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> Path:
    """The real `prepare` step on a small corpus (2-layer model, 4 experts)."""
    data = tmp_path_factory.mktemp("tiny") / "data"
    prep = ["prepare", "--out", str(data), "--conversations", "300", "--vocab-size", "512",
            "--vocab-sample", "150", "--layers", "2", "--experts", "4"]  # fmt: skip
    run_script(TRAIN_SCRIPT + prep, timeout=300)
    return data


def test_shared_prefix_training_equals_full_sequences(prepared_data):
    """Running the common tool-declaration prefix once per batch must give the loss and the
    gradients of running every conversation whole (it is only a speed-up)."""
    corpus = Corpus(prepared_data / "corpus.npz")
    assert max(len(p) for p in corpus.prefixes) > 100  # the tool declaration is shared
    hf_config = json.loads((prepared_data / "hf_config.json").read_text())
    torch.manual_seed(0)
    model = train.build_model(hf_config, torch.device("cpu"), "sdpa", None).train()
    batches = corpus.epoch_batches(np.random.default_rng(0), 2048)
    for idx in batches[:4]:
        assert len(set(corpus.group[idx].tolist())) == 1
        prefix, inputs, labels, _, _ = corpus.collate(idx)
        results = []
        for shared in (True, False):
            if not shared:  # the same rows, prefix included, no sharing
                inputs = torch.cat([prefix[None].expand(len(idx), -1), inputs], 1)
                labels = torch.cat([torch.full((len(idx), len(prefix)), -100), labels], 1)
                prefix = prefix[:0]
                whole = [corpus.tokens[corpus.offsets[i] : corpus.offsets[i + 1] - 1] for i in idx]
                assert all(inputs[r, : len(w)].tolist() == w.tolist() for r, w in enumerate(whole))
            model.zero_grad()
            loss = train.assistant_loss(model, prefix, inputs, labels, contextlib.nullcontext)
            loss.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            results.append((loss.item(), grads))
        (loss_shared, g_shared), (loss_full, g_full) = results
        assert loss_shared == pytest.approx(loss_full, rel=1e-5)
        assert g_shared.keys() == g_full.keys()
        for k in g_full:
            scale = g_full[k].abs().max().clamp(min=1e-12)
            assert ((g_shared[k] - g_full[k]).abs().max() / scale) < 1e-4, k


def test_copy_weights_mark_values_shown_earlier_in_the_dialogue(prepared_data):
    """Weighted targets are exactly the assistant tokens that already appeared outside an
    assistant turn earlier in the same conversation (and not in the shared prefix), and the
    targets inside a tool call's arguments up to and including its end marker."""
    corpus = Corpus(prepared_data / "corpus.npz")
    tok = KimiTokenizer.from_dir(prepared_data / "vocab")
    begin, end = (tok.special_ids[marker] for marker in (ARGUMENT_BEGIN, CALL_END))
    weighted = in_calls = 0
    for idx in corpus.epoch_batches(np.random.default_rng(1), 2048)[:6]:
        prefix, inputs, labels, lengths, weights = corpus.collate(idx, copy_weight=5.0)
        assert corpus.collate(idx)[4].eq(1.0).all()
        for row in range(len(idx)):
            shown, in_call = set(), False
            for t in range(int(lengths[row])):
                if not corpus.mask[corpus.offsets[idx[row]] + len(prefix) + t]:
                    shown.add(int(inputs[row, t]))
                token = int(inputs[row, t])
                in_call = (in_call or token == begin) and token != end
                target = int(labels[row, t])
                copied = target in shown and target not in prefix.tolist()
                expect = target != -100 and (copied or in_call)
                assert float(weights[row, t]) == (5.0 if expect else 1.0), (row, t)
                weighted += expect
                in_calls += expect and in_call and not copied
    assert weighted > 20  # names and numbers are copied in most tool conversations
    assert in_calls > 20  # call syntax, currency codes mapped from names, the end marker


def test_training_continues_from_saved_weights_with_the_same_vocabulary(prepared_data, tmp_path):
    """`train --init-weights` starts from a previous run's saved weights, or the average of
    several (refusing a model of other shapes by tensor name), and `prepare --vocab-from`
    keeps the token ids, so new data can feed a model that goes on training."""
    hf_config = json.loads((prepared_data / "hf_config.json").read_text())
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    first = train.build_model(hf_config, cpu, "sdpa", None)
    train.save_weights(first, tmp_path)
    torch.manual_seed(1)
    second = train.build_model(hf_config, cpu, "sdpa", None)
    train.load_weights(second, [tmp_path])

    def as_saved(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float() if t.dim() >= 2 else t.float()

    for name, value in second.state_dict().items():
        assert torch.equal(value.float(), as_saved(first.state_dict()[name])), name
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(2)
    train.save_weights(train.build_model(hf_config, cpu, "sdpa", None), other)
    third = train.build_model(hf_config, cpu, "sdpa", None)
    theirs = train.build_model(hf_config, cpu, "sdpa", None)
    train.load_weights(theirs, [other])
    train.load_weights(third, [tmp_path, other])
    for name, value in third.state_dict().items():
        if not name.endswith("inv_freq"):
            mean = (as_saved(first.state_dict()[name]) + theirs.state_dict()[name].float()) / 2
            assert torch.allclose(value.float(), mean), name
    wider = train.build_model(
        {**hf_config, "vocab_size": hf_config["vocab_size"] + 128}, cpu, "sdpa", None
    )
    with pytest.raises(
        SystemExit, match=r"tensor lm_head\.weight: saved \(768, 256\), this model \(896, 256\)"
    ):
        train.load_weights(wider, [tmp_path])

    data = tmp_path / "more"
    prep = ["prepare", "--out", str(data), "--conversations", "40", "--vocab-from",
            str(prepared_data / "vocab"), "--layers", "2", "--experts", "4"]  # fmt: skip
    run_script(TRAIN_SCRIPT + prep, timeout=300)
    for name in prepare.TOKENIZER_FILES:
        assert (data / "vocab" / name).read_bytes() == (prepared_data / "vocab" / name).read_bytes()


@pytest.mark.slow
def test_prepare_train_export_round_trip(prepared_data, tmp_path):
    """The real scripts end to end on CPU (a few steps of a 2-layer model): the exported
    Kimi-K2-format checkpoint loads in the reference loader and matches the float model."""
    data, weights, ckpt = prepared_data, tmp_path / "w", tmp_path / "ckpt"
    stats = json.loads((data / "prepare.json").read_text())
    assert stats["conversations"] == 300 and stats["vocab_size"] == 768
    # Bounded by steps, not by the clock: a busy machine must not change what is trained.
    train = ["train", "--data", str(data), "--out", str(weights), "--minutes", "5",
             "--max-steps", "20", "--batch-tokens", "2048", "--eval-cases", "8", "--warmup", "2"]  # fmt: skip
    run_script(TRAIN_SCRIPT + train, timeout=400)
    log = json.loads((weights / "train_log.json").read_text())
    assert log["steps"] == 20 and log["stopped_by"] == "max steps"
    assert set(log["evals"][-1]["exact_call"]) == {"catalogue_unseen_phrasing", "heldout_values"}
    dev = log["evals"][-1]["dev"]["token_accuracy"]
    assert set(dev) == {"catalogue_dev_phrasing", "dev_cities"}
    assert stats["dev_cases"] == {"catalogue_dev_phrasing": 90, "dev_cities": 40}
    score = ["score", "--data", str(data), "--weights", str(weights)]
    scored = json.loads(run_script(TRAIN_SCRIPT + score, timeout=120).stdout.splitlines()[-1])
    for split, accuracy in dev.items():  # the saved bf16 weights score as the trained ones
        assert abs(scored["token_accuracy"][split] - accuracy) < 0.05, (split, scored)
    state = export.read_trained_state(weights)
    cfg = load_model_config(data)
    export.write_kimi_checkpoint(state, cfg, data / "vocab", ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in index
    from safetensors import safe_open

    with safe_open(str(ckpt / index["model.layers.1.mlp.gate.e_score_correction_bias"]), "pt") as f:
        assert (
            f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        )
        weight = f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight")
        assert weight.dtype == torch_dtype(FP8_DTYPE)
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max() > 0  # the balancer moved it
    check = export.compare_with_float(ckpt, state, data / "eval.npz", stride=60)
    assert check["max_weight_error"] < 0.06, check  # e4m3: 3 mantissa bits
    assert check["rel_rms_logit_error"] < 0.1, check  # (argmax ties abound before training)
    assert KimiTokenizer.from_dir(ckpt).vocab_size == cfg.vocab_size


def _oracle(tok: KimiTokenizer, wrong_city: bool = False):
    """A generator that answers like a perfect model (or one that garbles city names)."""
    by_prompt = {tuple(tok.apply_chat_template(c.messages, tools=c.tools)): c for c in eval_cases()}

    def generate(prompts, max_new):
        out = []
        for p in prompts:
            text = tok.decode(p)
            if text.count("<|im_assistant|>") == 1:  # first turn: the call
                case = by_prompt[tuple(p)]
                if case.expected_tool is None:
                    out.append((tok.encode("Hello!"), "stop"))
                    continue
                args = dict(case.expected_args)
                if wrong_city and "city" in args:
                    args["city"] += "x"
                call = (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.{case.expected_tool}:0"
                        f"<|tool_call_argument_begin|>{json.dumps(args)}<|tool_call_end|><|tool_calls_section_end|>")  # fmt: skip
                out.append((tok.encode(call), "stop"))
            else:
                result = json.loads(text.rsplit("\n", 1)[1].split("<|im_end|>")[0])
                out.append((tok.encode("It is " + " ".join(map(str, result.values()))), "stop"))
        return out

    return generate


def test_eval_judges_calls_and_answers():
    tok = KimiTokenizer.from_dir(SMALL_VOCAB)
    cases = eval_cases()[::10] + [c for c in eval_cases() if c.expected_tool is None][:2]
    good = summarise(run_dialogues(_oracle(tok), SMALL_VOCAB, cases))
    assert all(good["passed"].values()), good
    assert good["small_talk_without_tool_call"]["rate"] == 1.0
    bad = summarise(run_dialogues(_oracle(tok, wrong_city=True), SMALL_VOCAB, cases))
    assert bad["figures"]["right_tool"]["rate"] == 1.0
    assert bad["figures"]["exact_args_heldout_values"]["rate"] < 0.5
    assert bad["heldout_exact_args_by_tool"]["get_weather"]["rate"] == 0.0
    assert bad["figures"]["answers_restate_result"]["rate"] == 1.0  # restates what the tool said


@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="tiny-kimi asset not trained yet"
)
def test_shipped_tiny_model_calls_tools():
    """The committed checkpoint is Kimi-K2-shaped and, greedily in transformers, answers
    catalogue prompts in phrasings it was never trained on with well-formed Kimi tool-call
    sections for the right tool, nearly all with exactly the right arguments. Thresholds sit
    one flip below what bench/results/tiny_model_eval.json measured on these 12 cases
    (12 / 12 / 10); the full figures against the issue's targets are in docs/tiny-model.md."""
    from kimi_trt.testing.hf_reference import load_reference_model

    cfg = load_model_config(DEFAULT_CHECKPOINT)
    assert cfg.weight_block_size is not None and cfg.n_routed_experts >= 8
    tok = KimiTokenizer.from_dir(DEFAULT_CHECKPOINT)
    model = load_reference_model(DEFAULT_CHECKPOINT)
    cases = [c for c in eval_cases() if c.split == "catalogue_unseen_phrasing"][:12]

    def generate(prompts, max_new):
        outs = []
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=list(tok.eos_token_ids), pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
            outs.append(
                (ids[:-1], "stop") if ids and ids[-1] in tok.eos_token_ids else (ids, "length")
            )
        return outs

    report = summarise(run_dialogues(generate, DEFAULT_CHECKPOINT, cases))
    assert report["figures"]["well_formed_sections"]["hits"] >= 11, report
    assert report["figures"]["right_tool"]["hits"] >= 11, report
    assert report["figures"]["exact_args_catalogue_unseen_phrasing"]["hits"] >= 9, report


def test_prepare_writes_compact_uint16_corpus(tmp_path):
    tok = KimiTokenizer.from_dir(SMALL_VOCAB)
    convs = list(training_conversations(7, 30))
    tokens, offsets, mask = prepare.tokenise_corpus(convs, tok)
    assert (
        tokens.dtype == np.uint16 and len(offsets) == 31 and offsets[-1] == len(tokens) == len(mask)
    )
    first, first_mask = prepare.conversation_ids(convs[0], tok, tok.chat_template)
    assert tokens[: offsets[1]].tolist() == first and mask[: offsets[1]].tolist() == first_mask


def test_export_rejects_missing_weights(tmp_path):
    with pytest.raises(Exception, match="no weights"):
        export.read_trained_state(tmp_path)


def test_export_averages_several_train_outputs(tmp_path):
    """`export --weights A B ...` ships the element-wise mean of the train outputs (how the
    shipped weights average phases 6, 7 and 8); folders holding different tensors are
    refused with one line naming the tensor, before anything is written."""
    from safetensors.torch import save_file

    a = {"w": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
    b = {"w": torch.tensor([[3.0, -2.0]]), "bias": torch.tensor([1.5])}
    mean = export.average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([[2.0, 0.0]]))
    assert torch.equal(mean["bias"], torch.tensor([1.0]))
    c = {"w": torch.tensor([[-1.0, 3.0]]), "bias": torch.tensor([1.0])}
    three = export.average_states([a, b, c])  # uniform, not the mean of (a, b) and c
    assert torch.equal(three["w"], torch.tensor([[1.0, 1.0]]))
    assert torch.equal(three["bias"], torch.tensor([1.0]))
    for name, state in (("a", a), ("other", {"w": a["w"]})):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "weights-00001-of-00001.safetensors"))
    out = tmp_path / "ckpt"
    cmd = TRAIN_SCRIPT + ["export", "--data", str(DEFAULT_CHECKPOINT), "--weights",
                          str(tmp_path / "a"), str(tmp_path / "other"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not out.exists(), proc.stderr
    assert proc.stderr.strip().startswith("error: export --weights: tensor bias is absent")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_expert_layouts_round_trip():
    """Fused experts (transformers 5) <-> Kimi's per-expert names, gate rows first."""
    cfg = prepare.tiny_model_config(2304, 2048, layers=2, experts=4)
    e, inter, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    fused = {
        "model.layers.1.mlp.experts.gate_up_proj": torch.randn(e, 2 * inter, h),
        "model.layers.1.mlp.experts.down_proj": torch.randn(e, h, inter),
    }
    named = export.hf_named_state(fused, cfg)
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(named["model.layers.1.mlp.experts.2.gate_proj.weight"], gate_up[2, :inter])
    assert torch.equal(named["model.layers.1.mlp.experts.2.up_proj.weight"], gate_up[2, inter:])
    back = export.fused_experts_state(named, cfg)
    assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)


EXACT_SPLITS = ("catalogue_unseen_phrasing", "heldout_values")


@pytest.mark.mpi
@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="tiny-kimi asset not trained yet"
)
def test_eval_script_through_convert_and_mpirun(tmp_path):
    """The bench script's real path on the shipped model: convert to TP4 / MoE TP2 x EP2
    block-FP8 rank files, greedy under `mpirun -np 4`, parse, run the tool, answer."""
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "eval_tiny_model.py"),
        "--limit",
        "6",
        "--out",
        str(out),
    ]
    run_script(cmd, timeout=300)
    report = json.loads(out.read_text())
    assert report["layout"] == {"world": 4, "tp": 4, "ep": 2, "moe_tp": 2}
    # measured on these 6 spread cases: 6 well-formed, 6 right tool, 6 exact arguments (the
    # full figures are in bench/results/tiny_model_eval.json); room for one flip each
    assert report["figures"]["well_formed_sections"]["hits"] >= 5, report["figures"]
    assert report["figures"]["right_tool"]["hits"] >= 5, report["figures"]
    exact = sum(report["figures"][f"exact_args_{s}"]["hits"] for s in EXACT_SPLITS)
    assert exact >= 5, report["figures"]
