"""Silent-thought training: the pathway layouts and KD positions by hand, the losses against hand computations on a
tiny model (teacher detached, pause arm without CoT rows), and `leapserve train sft` / `train dart` end to end
(export, LoRA merge, resume)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import openai
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leapserve.cli.main import build_parser, main
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.args import config_from_args
from leapserve.decoding.silent_thought import SilentThought, SilentThoughtConfig, load_silent_thought, st_positions
from leapserve.training import dart, sft
from leapserve.training.dart import (
    Example,
    LossWeights,
    cot_layout,
    dart_loss,
    distill_loss,
    st_layout,
    step_alignment,
)
from leapserve.training.loop import STATE_FILE
from leapserve.training.sft import causal_lm_loss
from test_server import API_KEY, MODEL, _free_port, served

# ---- layouts by hand ------------------------------------------------------------------------------------------------

Q, SEP, PROMPT, ANSWER, EOS, PAD = [10, 11, 12], [20], [40, 41], [50], 0, 7
STEPS = [[30, 31], [32, 33], [34, 35]]


def test_cot_layout_drops_the_last_step_and_reads_the_answer_prompts_last_token():
    x = cot_layout(Q, SEP, STEPS, PROMPT, ANSWER, EOS)
    #        0   1   2   3   4   5   6   7   8   9  10 11
    assert x.ids == [10, 11, 12, 20, 30, 31, 32, 33, 40, 41, 50, 0]  # step [34, 35] dropped
    assert x.kd_index == 9  # the "41" of the answer prompt [40, 41]
    assert x.marks == [5, 7]  # the last token of each kept step
    assert x.targets == [False] * 4 + [True] * 8  # steps, answer prompt, answer, EOS
    one_step = cot_layout(Q, SEP, STEPS[:1], PROMPT, ANSWER, EOS)
    assert one_step.ids == [10, 11, 12, 20, 40, 41, 50, 0] and one_step.kd_index == 5
    assert one_step.marks == [3]  # no step kept: the separator's last token


def test_st_layout_places_k_placeholders_after_the_separator():
    x = st_layout(Q, SEP, 3, PROMPT, ANSWER, EOS, placeholder=PAD)
    #        0   1   2   3  4  5  6   7   8   9 10
    assert x.ids == [10, 11, 12, 20, 7, 7, 7, 40, 41, 50, 0]
    assert x.marks == [4, 5, 6] and x.kd_index == 8
    assert x.targets == [False] * 9 + [True, True]  # the answer and EOS only: the answer prompt is the server's
    assert st_layout(Q, [], 1, [40], ANSWER, EOS, PAD).ids == [10, 11, 12, 7, 40, 50, 0]
    with pytest.raises(ValueError, match="answer prompt"):
        st_layout(Q, SEP, 2, [], ANSWER, EOS, PAD)


def test_step_alignment_spreads_boundaries_evenly():
    assert step_alignment(2, 2) == [0, 1]
    assert step_alignment(2, 4) == [0, 0, 1, 1]
    assert step_alignment(4, 2) == [1, 3]
    assert step_alignment(3, 2) == [1, 2]
    assert step_alignment(1, 3) == [0, 0, 0]


# ---- losses by hand -------------------------------------------------------------------------------------------------


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def test_distill_loss_by_hand_and_the_teacher_gets_no_gradient():
    s1, t1 = [[0.0, 2.0], [1.0, -1.0]], [[0.5, 0.0], [1.0, 1.0]]  # layer 1: N = 2 vectors of d = 2
    s2, t2 = [[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.2]]
    want = []
    for s, t in ((s1, t1), (s2, t2)):
        pairs = [(a, b) for sr, tr in zip(s, t) for a, b in zip(sr, tr)]
        want.append(sum(_smooth_l1(a, b) for a, b in pairs) / len(pairs) / _std([b for _, b in pairs]))
    student = [torch.tensor(s1, requires_grad=True), torch.tensor(s2, requires_grad=True)]
    teacher = [torch.tensor(t1, requires_grad=True), torch.tensor(t2, requires_grad=True)]
    loss = distill_loss(student, teacher)
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    loss.backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)


def test_causal_lm_loss_scores_only_the_targets_from_the_position_before():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 2, 1, 0]])
    targets = torch.tensor([[False, False, True, True]])  # positions 2 and 3: read rows 1 and 2
    want = (F.cross_entropy(logits[0, 1], ids[0, 2]) + F.cross_entropy(logits[0, 2], ids[0, 3])) / 2
    assert causal_lm_loss(logits, ids, targets).item() == pytest.approx(want.item(), rel=1e-6)


def _tiny_model(vocab: int = 60, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


def _thought(model, rem_mode: str = "layer_adapter", k: int = 3) -> SilentThought:
    cfg = SilentThoughtConfig(k, ">", "#", rem_mode=rem_mode, rem_rank=8, jacobi_iterations=2 * (rem_mode == "jacobi"))
    torch.manual_seed(1)
    st = SilentThought(cfg, model.config.hidden_size, model.config.num_hidden_layers)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.3 * torch.randn_like(p))  # adapters that do something (their up starts at zero)
    st.install(model)
    return st


def _examples(k: int = 2) -> list[Example]:
    """Two examples of different lengths (the batch is padded): a 3-token and a 5-token question."""
    first = Example(cot_layout(Q, SEP, STEPS, PROMPT, ANSWER, EOS), st_layout(Q, SEP, k, PROMPT, ANSWER, EOS, PAD))
    q2, steps2, answer2 = [13, 14, 15, 16, 17], [[36, 37], [38, 39]], [51, 52]
    second = Example(
        cot_layout(q2, SEP, steps2, PROMPT, answer2, EOS), st_layout(q2, SEP, k, PROMPT, answer2, EOS, PAD)
    )
    return [first, second]


# The positions of `_examples(k=2)`, counted by hand:
#   CoT 1: 10 11 12 20 30 31 32 33 40 41 50 0    ST 1: 10 11 12 20 P P 40 41 50 0
#   CoT 2: 13 14 15 16 17 20 36 37 40 41 51 52 0  ST 2: 13 14 15 16 17 20 P P 40 41 51 52 0
BY_HAND = [
    {"st": [4, 5], "kd_st": 7, "st_targets": [8, 9], "kd_cot": 9, "cot_targets": range(4, 12), "ends": [5, 7]},
    # one kept step: both ST tokens are aligned to its end
    {"st": [6, 7], "kd_st": 9, "st_targets": [10, 11, 12], "kd_cot": 9, "cot_targets": range(6, 13), "ends": [7, 7]},
]


def _run_alone(model, st, ex: Example, st_pos: list[int]):
    """Each pathway of one example run on its own (no batch, no padding): (CoT output, ST output)."""
    with torch.no_grad():
        t_out = model(torch.tensor([ex.cot.ids]), output_hidden_states=True)
        embeds = model.get_input_embeddings()(torch.tensor([ex.st.ids]))
        mask = torch.zeros(1, len(ex.st.ids), dtype=torch.bool)
        mask[0, st_pos] = True
        z0 = z = st.embeddings
        for _ in range(st.config.jacobi_iterations):
            e = embeds.clone()
            e[0, st_pos] = z
            with st_positions(mask[:, : st_pos[-1] + 1]):
                h = model.model(inputs_embeds=e[:, : st_pos[-1] + 1]).last_hidden_state
            z = z0 + st.jacobi(h[0, st_pos])
        embeds[0, st_pos] = z
        with st_positions(mask):
            s_out = model(inputs_embeds=embeds, output_hidden_states=True)
    return t_out, s_out


def _ce(out, ids: list[int], positions) -> list[float]:
    return [F.cross_entropy(out.logits[0, i - 1], torch.tensor(ids[i])).item() for i in positions]


@pytest.mark.parametrize("rem_mode", ["layer_adapter", "jacobi", "none"])
def test_dart_loss_terms_equal_the_pathways_run_alone(rem_mode):
    model = _tiny_model()
    st = _thought(model, rem_mode, k=2)
    batch = _examples(k=2)
    loss, parts = dart_loss(model, st, batch, LossWeights(alpha=1.0, gamma=0.5, beta=2.0, lam=3.0), PAD)
    ce_st, ce_cot, kd_s, kd_t, st_s, st_t = [], [], [], [], [], []
    for ex, hand in zip(batch, BY_HAND):
        t_out, s_out = _run_alone(model, st, ex, hand["st"])
        ce_st += _ce(s_out, ex.st.ids, hand["st_targets"])
        ce_cot += _ce(t_out, ex.cot.ids, hand["cot_targets"])
        kd_s.append([h[0, hand["kd_st"]] for h in s_out.hidden_states[1:]])
        kd_t.append([h[0, hand["kd_cot"]] for h in t_out.hidden_states[1:]])
        st_s.append([h[0, hand["st"]] for h in s_out.hidden_states[1:]])
        st_t.append([h[0, hand["ends"]] for h in t_out.hidden_states[1:]])
    layers = range(len(kd_s[0]))
    want = {
        "ce_st": sum(ce_st) / len(ce_st),  # the batch's target tokens together: 2 + 3
        "ce_cot": sum(ce_cot) / len(ce_cot),  # 8 + 7
        "kd_ans": distill_loss(
            [torch.stack([kd_s[b][n] for b in range(2)]) for n in layers],
            [torch.stack([kd_t[b][n] for b in range(2)]) for n in layers],
        ).item(),
        "kd_st": distill_loss(
            [torch.cat([st_s[b][n] for b in range(2)]) for n in layers],
            [torch.cat([st_t[b][n] for b in range(2)]) for n in layers],
        ).item(),
    }
    assert len(ce_st) == 5 and len(ce_cot) == 15
    assert parts == pytest.approx(want, rel=1e-4, abs=1e-6)
    total = want["ce_st"] + 0.5 * want["ce_cot"] + 2.0 * want["kd_ans"] + 3.0 * want["kd_st"]
    assert loss.item() == pytest.approx(total, rel=1e-4)


def test_kd_reads_exactly_the_answer_prompts_last_token():
    """KD_ans equals the distance at the hand-counted positions, and not at their neighbours: an index off by one
    in either pathway fails this."""
    model = _tiny_model()
    st = _thought(model, "none", k=2)
    batch = _examples(k=2)
    _, parts = dart_loss(model, st, batch, LossWeights(gamma=0.0), PAD)
    outs = [_run_alone(model, st, ex, hand["st"]) for ex, hand in zip(batch, BY_HAND)]

    def kd(s_shift: int, t_shift: int) -> float:
        layers = range(len(outs[0][0].hidden_states) - 1)
        s = [
            torch.stack([o[1].hidden_states[n + 1][0, h["kd_st"] + s_shift] for o, h in zip(outs, BY_HAND)])
            for n in layers
        ]
        t = [
            torch.stack([o[0].hidden_states[n + 1][0, h["kd_cot"] + t_shift] for o, h in zip(outs, BY_HAND)])
            for n in layers
        ]
        return distill_loss(s, t).item()

    assert parts["kd_ans"] == pytest.approx(kd(0, 0), rel=1e-5)
    for shifts in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1)):
        assert kd(*shifts) != pytest.approx(parts["kd_ans"], rel=1e-3)


def test_kd_gives_no_gradient_to_the_teacher_rows():
    model = _tiny_model()
    st = _thought(model, "layer_adapter", k=2)
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    model.get_input_embeddings().register_forward_hook(keep)
    loss, parts = dart_loss(model, st, _examples(k=2), LossWeights(gamma=0.0, beta=1.0, lam=1.0), PAD)
    assert set(parts) == {"ce_st", "kd_ans", "kd_st"}
    loss.backward()
    grad = seen[-1].grad  # [teacher rows, student rows]
    assert grad.shape[0] == 4 and grad[:2].abs().sum() == 0 and grad[2:].abs().sum() > 0


def test_pause_arm_runs_no_cot_rows_and_has_only_the_answer_ce():
    model = _tiny_model()
    st = _thought(model, "none", k=2)
    rows = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    loss, parts = dart_loss(model, st, _examples(k=2), LossWeights(alpha=1.0, gamma=0.0, beta=0.0, lam=0.0), PAD)
    assert set(parts) == {"ce_st"} and rows == [2] and loss.item() == pytest.approx(parts["ce_st"])


def test_hidden_states_show_the_adapted_st_positions():
    """The KD terms read transformers' hidden_states: at the ST positions they must be the adapters' outputs."""
    model = _tiny_model()
    st = _thought(model, "layer_adapter", k=2)
    raw = []
    model.model.layers[0].register_forward_hook(
        lambda m, a, out: raw.append((out[0] if isinstance(out, tuple) else out).detach()), prepend=True
    )
    ex = _examples(k=2)[0]
    _, s_out = _run_alone(model, st, ex, [4, 5])
    before = raw[-1][0, [4, 5]]
    with torch.no_grad():
        adapted = st.adapters["0"](before)
    torch.testing.assert_close(s_out.hidden_states[1][0, [4, 5]], adapted)
    assert not torch.allclose(adapted, before)


# ---- end to end -----------------------------------------------------------------------------------------------------


def _affine(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = rng.randrange(5)
        question, steps = str(x), []
        for _ in range(3):
            if rng.random() < 0.5:
                a = rng.randrange(5)
                question, x = question + f"+{a}", (x + a) % 5
            else:
                b = rng.choice([2, 3, 4])
                question, x = question + f"*{b}", (x * b) % 5
            steps.append(f"{x};")
        rows.append({"question": question + "=", "steps": steps, "answer": str(x)})
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TRAIN = ["--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "2", "--device", "cpu"]
DART = ["--separator", ">", "--answer-prompt", "#", "--num-thoughts", "2", "--rem-rank", "8", *TRAIN]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dart-data")
    rows = _affine(64)
    cot = [{"prompt": r["question"] + ">", "response": "".join(r["steps"]) + "#" + r["answer"]} for r in rows]
    return _write_jsonl(d / "cot.jsonl", cot), _write_jsonl(d / "dart.jsonl", rows)


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("sft") / "base"
    args = ["--tokenizer", "char", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--steps", "4"]
    main(["train", "sft", "--data", data[0], "--out", str(out), *args, *TRAIN])
    return out


def test_train_sft_exports_a_causal_llama(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "diffusion_lm" not in config
    tok = AutoTokenizer.from_pretrained(base)
    assert config["vocab_size"] == len(tok) == 3 + len(set("01234+*=>#;"))  # Z_5: digits 0-4
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([tok.encode("1+2*3=>", add_special_tokens=False)])
    later = torch.cat([ids, ids], 1)
    with torch.no_grad():  # causal: a later token changes nothing before it
        torch.testing.assert_close(model(later).logits[0, : ids.shape[1]], model(ids).logits[0])
    card = (base / "README.md").read_text()
    assert "## Command" in card and "64 sequences" in card and "| steps done | 4 |" in card


def test_train_sft_init_from_reads_the_checkpoint(tmp_path, base, data):
    out = tmp_path / "nocot"
    rows = [{"prompt": r["question"] + ">#", "response": r["answer"]} for r in _affine(16, seed=3)]
    direct = _write_jsonl(tmp_path / "direct.jsonl", rows)
    main(["train", "sft", "--data", direct, "--out", str(out), "--init-from", str(base), "--steps", "2", *TRAIN])
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(base / "model.safetensors")).keys()
    with pytest.raises(SystemExit, match="char"):
        main(["train", "sft", "--data", direct, "--out", str(out), f"--init-from={base}", "--tokenizer=char"])


@pytest.fixture(scope="module")
def dart_checkpoint(tmp_path_factory, base, data):
    out = tmp_path_factory.mktemp("dart") / "st"
    main(
        [
            "train",
            "dart",
            "--model",
            str(base),
            "--data",
            data[1],
            "--out",
            str(out),
            "--lam",
            "1",
            "--steps",
            "4",
            *DART,
        ]
    )
    return out


def test_train_dart_exports_a_silent_thought_checkpoint(dart_checkpoint, base):
    from transformers import AutoModelForCausalLM

    config = json.loads((dart_checkpoint / "config.json").read_text())
    assert config["silent_thought"] == SilentThoughtConfig(2, ">", "#", rem_rank=8).to_dict()
    st_config, module = load_silent_thought(dart_checkpoint, config["hidden_size"], 2, "cpu", torch.float32)
    assert st_config.num_thoughts == 2 and set(module.adapters) == {"0", "1"}
    got, was = load_file(str(dart_checkpoint / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert got.keys() == was.keys() and not torch.equal(
        got["model.embed_tokens.weight"], was["model.embed_tokens.weight"]
    )
    AutoModelForCausalLM.from_pretrained(dart_checkpoint)
    card = (dart_checkpoint / "README.md").read_text()
    assert "--decoder silent-thought" in card and "| steps done | 4 |" in card and "1, 1, 1, 1" in card


def test_train_dart_resumes_to_the_same_weights(tmp_path, base, data, dart_checkpoint, monkeypatch):
    out = tmp_path / "resumed"
    args = [
        "train",
        "dart",
        "--model",
        str(base),
        "--data",
        data[1],
        "--out",
        str(out),
        "--lam",
        "1",
        "--steps",
        "4",
        *DART,
    ]
    calls = iter(range(1, 100))

    def interrupted(*a, **kw):
        if next(calls) == 4:  # the state of step 2 is on disk
            raise KeyboardInterrupt
        return dart_loss(*a, **kw)

    monkeypatch.setattr(dart, "dart_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert not out.exists() and torch.load(tmp_path / "resumed.train" / STATE_FILE, weights_only=False)["step"] == 2
    main(args)
    for name in ("model.safetensors", "silent_thought.safetensors"):
        got, want = load_file(str(out / name)), load_file(str(dart_checkpoint / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_train_dart_lora_jacobi_pause_merges_into_plain_weights(tmp_path, base, data):
    out = tmp_path / "lora"
    args = ["--rem-mode", "jacobi", "--jacobi-iterations", "2", "--beta", "0", "--gamma", "0", "--lora-rank", "4"]
    main(["train", "dart", "--model", str(base), "--data", data[1], "--out", str(out), "--steps", "2", *args, *DART])
    got, was = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert got.keys() == was.keys()  # LoRA merged: plain Llama weights
    changed = {k for k in was if not torch.equal(got[k], was[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # the embedding stayed frozen
    assert set(load_file(str(out / "silent_thought.safetensors"))) >= {"embeddings", "jacobi.0.weight"}
    card = (out / "README.md").read_text()
    assert "pause tokens" in card and "LoRA r=4" in card


def test_train_dart_rejects_bad_settings(tmp_path, base, data):
    run = ["train", "dart", "--model", str(base), "--data", data[1], "--out", str(tmp_path / "x"), "--steps", "1"]
    with pytest.raises(SystemExit, match="jacobi"):
        main([*run, "--rem-mode", "jacobi", *DART])
    with pytest.raises(SystemExit, match="does not know"):
        main([*run, *DART, "--answer-prompt", "The answer is:"])  # no such characters in the char vocabulary
    with pytest.raises(SystemExit, match="question"):
        main([*run[:-2], "--data", _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1"}]), *DART])


@pytest.mark.parametrize(("command", "cls"), [("sft", sft.SFTConfig), ("dart", dart.DARTConfig)])
def test_flags_default_to_the_configs(command, cls):
    required = {"data": "d", "out": "o", **({"model": "m"} if command == "dart" else {})}
    args = build_parser().parse_args(["train", command, *[a for k, v in required.items() for a in (f"--{k}", v)]])
    assert config_from_args(cls, args) == cls(**required)


# ---- the reproduction harness's task and verdict --------------------------------------------------------------------


def test_dart_repro_task_split_and_verdict():
    from leapserve.benchmarks import dart_repro as repro

    assert repro.solve("3+4*2+1=") == (["2;", "4;", "0;"], "0")  # 3+4 = 2, 2*2 = 4, 4+1 = 0 (mod 5)
    train_q, test_q = repro.split_questions()
    assert len(train_q) + len(test_q) == 5 * 8**3 and len(test_q) == 640 and not set(train_q) & set(test_q)
    assert repro.split_questions() == (train_q, test_q)  # fixed: the same for every seed
    assert repro.answer("2;4;0;#0") == "0" and repro.answer("3") == "3" and repro.answer("#;") is None

    def runs(accuracy: dict[str, float], st_tokens: float = 2.0) -> list[dict]:
        tokens = {"no-cot": 2.0, "pause": st_tokens, "dart-r0": st_tokens, "dart-r2": st_tokens}
        pathways = {k: {"accuracy": v, "generated_tokens": tokens.get(k, 9.0)} for k, v in accuracy.items()}
        return [{"pathways": pathways}] * 3

    base = {"no-cot": 0.30, "pause": 0.32}
    assert repro.verdict(runs({**base, "dart-r0": 0.40, "dart-r2": 0.41})).startswith("Reproduced")
    assert "only DART-ST (R=2)" in repro.verdict(runs({**base, "dart-r0": 0.36, "dart-r2": 0.41}))
    assert repro.verdict(runs({**base, "dart-r0": 0.40, "dart-r2": 0.40}, st_tokens=3.0)).startswith("Not reproduced")


def test_trained_checkpoint_is_served_over_http(dart_checkpoint, data, tmp_path):
    """Train, then serve: the checkpoint `train dart` wrote answers through the real server and `openai` client, on
    every pathway, streamed and not, the same text as the offline engine."""
    question = json.loads(open(data[1]).readline())["question"]
    llm = LLM(str(dart_checkpoint), decoder="silent-thought", enforce_eager=True)
    expected = {
        r: llm.generate(question, SamplingParams(max_tokens=8, temperature=0, extra_args={"reasoning": r}))[0]
        for r in ("st", "direct", "cot")
    }
    port = _free_port()
    cmd = [sys.executable, "-m", "leapserve.cli", "serve", "--model", str(dart_checkpoint), "--decoder"]
    cmd += ["silent-thought", "--served-model-name", MODEL, "--port", str(port), "--api-key", API_KEY]
    env = dict(os.environ)
    with served(cmd, port, tmp_path / "server.log", env=env, cwd=Path(__file__).parent, startup_timeout=120):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)
        for reasoning, out in expected.items():
            body = {"vllm_xargs": {"reasoning": reasoning}}
            whole = client.completions.create(
                model=MODEL, prompt=question, max_tokens=8, temperature=0, extra_body=body
            )
            assert whole.choices[0].text == out.outputs[0].text
            stream = client.completions.create(
                model=MODEL, prompt=question, max_tokens=8, temperature=0, extra_body=body, stream=True
            )
            assert "".join(c.choices[0].text for c in stream if c.choices) == out.outputs[0].text
