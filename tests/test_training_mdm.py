"""Masked diffusion LM training: LLaDA's SFT loss and dParallel's certainty-forcing loss by hand, the complementary
views, the bidirectional forward, LoRA, and `leapserve train mdm` / `train dparallel` end to end (resume included)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from leapserve.cli.main import build_parser, main
from leapserve.decoding.args import config_from_args
from leapserve.training import dparallel, mdm
from leapserve.training.dparallel import (
    LoRALinear,
    add_lora,
    canvas,
    certainty_forcing_loss,
    complementary_views,
    merge_lora,
)
from leapserve.training.loop import STATE_FILE
from leapserve.training.mdm import (
    EPS,
    bidirectional,
    char_tokenizer,
    llada_loss,
    llada_masking,
)

# ---- losses by hand -------------------------------------------------------------------------------------------------


def _log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    z = [x / temperature for x in row]
    log_norm = math.log(sum(math.exp(x) for x in z))
    return [x - log_norm for x in z]


def _ce(row: list[float], target: int) -> float:
    return -_log_softmax(row)[target]


def _entropy(row: list[float], temperature: float) -> float:
    return -sum(math.exp(lp) * lp for lp in _log_softmax(row, temperature))


# V = 3, B = 1, L = 4; targets [0, 1, 2, 0]
LOGITS_A = [[5.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
LOGITS_B = [[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, -1.0]]
TARGETS = [0, 1, 2, 0]


def test_certainty_forcing_loss_by_hand():
    la, lb, y = torch.tensor([LOGITS_A]), torch.tensor([LOGITS_B]), torch.tensor([TARGETS])
    mask_a = torch.tensor([[False, True, True, False]])  # A: position 1 right (argmax 1), position 2 wrong (argmax 0)
    mask_b = torch.tensor([[False, False, False, True]])  # B: position 3 right (argmax 0)
    ce_a = (_ce(LOGITS_A[1], 1) + _ce(LOGITS_A[2], 2)) / 2
    ce_b = _ce(LOGITS_B[3], 0)
    ent_a = _entropy(LOGITS_A[1], 0.5)  # only the correctly predicted masked token
    ent_b = _entropy(LOGITS_B[3], 0.5)
    loss, parts = certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=2.0, temperature=0.5)
    assert loss.item() == pytest.approx(ce_a + ce_b + 2 * (ent_a + ent_b), rel=1e-6)
    assert parts == pytest.approx({"ce": ce_a + ce_b, "ent": ent_a + ent_b}, rel=1e-6)
    control, _ = certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=0.0, temperature=0.5)
    assert control.item() == pytest.approx(ce_a + ce_b, rel=1e-6)
    # no correct masked token in a view: its entropy term is 0 (and an empty view adds nothing at all)
    none_right, _ = certainty_forcing_loss(la, lb, y, mask_a & (y == 2), mask_b & False, beta=2.0, temperature=0.5)
    assert none_right.item() == pytest.approx(_ce(LOGITS_A[2], 2), rel=1e-6)
    # the gradient of the entropy term reaches only the correct masked position
    la.requires_grad_(True)
    certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=2.0)[0].backward()
    assert la.grad[0, [0, 3]].abs().sum() == 0 and la.grad[0, 1].abs().sum() > 0


def test_certainty_forcing_loss_with_logits_shift_by_hand():
    """Row j-1 predicts position j (Dream): position 1 is scored with row 0, position 3 with row 2."""
    la, lb, y = torch.tensor([LOGITS_A]), torch.tensor([LOGITS_B]), torch.tensor([TARGETS])
    mask_a = torch.tensor([[False, True, False, False]])  # row 0 predicts 1: argmax 0, wrong
    mask_b = torch.tensor([[False, False, False, True]])  # row 2 predicts 0: argmax 2, wrong; row 1 below: right
    ce_a, ce_b = _ce(LOGITS_A[0], 1), _ce(LOGITS_B[2], 0)
    loss, _ = certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=2.0, logits_shift=True)
    assert loss.item() == pytest.approx(ce_a + ce_b, rel=1e-6)
    mask_b = torch.tensor([[False, False, True, False]])  # row 1 predicts position 2 (target 2): argmax 0, wrong
    mask_a = torch.tensor([[False, False, True, False]])  # row 1 of A: argmax 1, wrong too
    loss, parts = certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=2.0, logits_shift=True)
    assert loss.item() == pytest.approx(_ce(LOGITS_A[1], 2) + _ce(LOGITS_B[1], 2), rel=1e-6) and parts["ent"] == 0
    mask_a = torch.tensor([[False, False, False, True]])  # row 2 of A predicts position 3 (target 0): right
    loss, _ = certainty_forcing_loss(la, lb, y, mask_a, mask_b, beta=2.0, logits_shift=True)
    expected = _ce(LOGITS_A[2], 0) + _ce(LOGITS_B[1], 2) + 2 * _entropy(LOGITS_A[2], 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_llada_sft_loss_by_hand():
    logits = torch.tensor([LOGITS_A, LOGITS_B])  # B = 2, L = 4, V = 3
    targets = torch.tensor([TARGETS, [1, 1, 2, 0]])
    masked = torch.tensor([[False, True, True, False], [False, False, False, True]])
    p_mask = torch.tensor([0.5, 0.25])
    answer_len = torch.tensor([3, 2])  # prompts of 1 and 2 tokens
    row0 = (_ce(LOGITS_A[1], 1) + _ce(LOGITS_A[2], 2)) / 0.5 / 3
    row1 = _ce(LOGITS_B[3], 0) / 0.25 / 2
    assert llada_loss(logits, targets, masked, p_mask, answer_len).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    shifted = llada_loss(logits, targets, masked, p_mask, answer_len, logits_shift=True)  # row j-1 -> position j
    row0 = (_ce(LOGITS_A[0], 1) + _ce(LOGITS_A[1], 2)) / 0.5 / 3
    row1 = _ce(LOGITS_B[2], 0) / 0.25 / 2
    assert shifted.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_llada_masking_masks_only_answers_at_the_rows_rate():
    torch.manual_seed(0)
    maskable = torch.arange(4000)[None].expand(64, -1) >= 100  # a 100-token prompt
    masked, p = llada_masking(maskable)
    assert not masked[:, :100].any() and masked.shape == maskable.shape
    assert ((p >= EPS) & (p <= 1)).all() and p.std() > 0.2  # one t ~ U(0, 1) per row
    torch.testing.assert_close(masked[:, 100:].float().mean(1), p, atol=0.03, rtol=0)


def test_complementary_views_partition_one_block():
    torch.manual_seed(0)
    prompt_lens, lengths, b, width = torch.tensor([3, 5, 2]), torch.tensor([3 + 16, 5 + 16, 2 + 13]), 4, 22
    starts = set()
    for _ in range(200):
        a, bb, future = complementary_views(prompt_lens, lengths, width, b)
        for row in range(3):
            p, n = int(prompt_lens[row]), int(lengths[row])
            block = (a[row] | bb[row]).nonzero().flatten().tolist()
            assert not (a[row] & bb[row]).any() and block  # disjoint, and the block is never empty
            s = block[0]
            e = min(s + b, n)
            assert (s - p) % b == 0 and block == list(range(s, e))  # the whole block, one of A or B each
            assert future[row].nonzero().flatten().tolist() == list(range(e, n))  # after it, inside the row
            starts.add((row, s - p))
    # every block is drawn, the last partial one of row 2 (13 = 3 * 4 + 1) included
    assert {s for r, s in starts if r == 2} == {0, 4, 8, 12} and {s for r, s in starts if r == 0} == {0, 4, 8, 12}
    a, bb, _ = complementary_views(torch.tensor([2]), torch.tensor([2 + 4096]), 4098, 4096)
    assert a.sum().item() == pytest.approx(2048, abs=200)  # p = (1 - eps) 0.5 + eps


def test_canvas_cuts_after_eos_and_pads():
    assert canvas([5, 6, 0, 7], 6, eos=0) == [5, 6, 0, 0, 0, 0]
    assert canvas([5, 6, 7], 2, eos=0) == [5, 6] and canvas([5], 3, eos=0) == [5, 0, 0]


# ---- the model ------------------------------------------------------------------------------------------------------


def _tiny_model(vocab: int = 12):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


def test_training_forward_is_bidirectional_and_ignores_padding():
    model = _tiny_model()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    later = ids.clone()
    later[0, 5] = 9
    with torch.no_grad():
        causal = model(ids).logits, model(later).logits
        torch.testing.assert_close(causal[0][0, :5], causal[1][0, :5])  # control: transformers' default is causal
        bidirectional(model)
        both = model(ids).logits, model(later).logits
        assert (both[0][0, :5] - both[1][0, :5]).abs().amax(-1).min() > 1e-4  # every earlier position sees it
        # dparallel's batches: a key-padding mask hides positions past a row's length, in both directions
        padded = model(torch.tensor([[1, 2, 3, 4, 7, 7]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
        torch.testing.assert_close(padded[0, :4], model(ids[:, :4]).logits[0])


def test_lora_starts_at_the_base_and_merges_exactly():
    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model(ids).logits
    assert add_lora(model, rank=4, alpha=8) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)  # B = 0: untrained adapter is a no-op
        merge_lora(model)
        assert model.state_dict().keys() == base.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
        add_lora(model, rank=4, alpha=8)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
        adapted = model(ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        assert not torch.equal(model(ids).logits, want)


def test_char_tokenizer_round_trips_and_renders_chats(tmp_path):
    from transformers import AutoTokenizer

    char_tokenizer(["ab c\n", "1+2=3"]).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|eos|>", "<|mdm_mask|>", "<|unk|>"]
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 0, 1)
    ids = tok.encode("1+2=3 c\n", add_special_tokens=False)
    assert len(ids) == 8 and tok.decode(ids) == "1+2=3 c\n"
    assert tok.encode("z", add_special_tokens=False) == [2]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+2="}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "1+2="


@pytest.mark.parametrize(("command", "cls"), [("mdm", mdm.MDMConfig), ("dparallel", dparallel.DParallelConfig)])
def test_flags_default_to_the_configs(command, cls):
    required = {"data": "d", "out": "o", **({"model": "m"} if command == "dparallel" else {})}
    args = build_parser().parse_args(["train", command, *[a for k, v in required.items() for a in (f"--{k}", v)]])
    assert config_from_args(cls, args) == cls(**required)


# ---- end to end -----------------------------------------------------------------------------------------------------


def _digit_sums(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in pairs]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MDM_ARGS = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--seq-len", "8",
    "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "2", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("mdm-data") / "sums.jsonl", _digit_sums(200))


@pytest.fixture(scope="module")
def mdm_checkpoint(tmp_path_factory, sums):
    out = tmp_path_factory.mktemp("mdm") / "ckpt"
    main(["train", "mdm", "--data", sums, "--out", str(out), "--tokenizer", "char", "--steps", "6", *MDM_ARGS])
    return out


def test_train_mdm_writes_a_loadable_diffusion_checkpoint(mdm_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((mdm_checkpoint / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(mdm_checkpoint)
    assert config["diffusion_lm"] == {"mask_token_id": tok.mask_token_id, "logits_shift": False}
    assert config["architectures"] == ["LlamaForCausalLM"] and config["is_causal"] is False
    assert config["vocab_size"] == len(tok) == 3 + len(set("0123456789+="))
    assert all(t.dtype == torch.float32 for t in load_file(str(mdm_checkpoint / "model.safetensors")).values())
    model = AutoModelForCausalLM.from_pretrained(mdm_checkpoint)
    ids = torch.tensor([tok.encode("3+4=", add_special_tokens=False) + [tok.mask_token_id] * 4])
    later = ids.clone()
    later[0, -1] = tok.eos_token_id
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, 8, len(tok))
        assert not torch.allclose(model(later).logits[0, 0], logits[0, 0])  # is_causal false: bidirectional as loaded
    card = (mdm_checkpoint / "README.md").read_text()
    assert "## Command" in card and "200 sequences" in card and "| steps done | 6 |" in card


def test_train_mdm_resumes_to_the_same_weights(tmp_path, sums, mdm_checkpoint, monkeypatch):
    out = tmp_path / "resumed"
    args = ["train", "mdm", "--data", sums, "--out", str(out), "--steps", "6", *MDM_ARGS]
    calls = iter(range(1, 100))

    def interrupted(*a, **kw):
        if next(calls) == 6:  # the state of step 4 is on disk
            raise KeyboardInterrupt
        return llada_loss(*a, **kw)

    monkeypatch.setattr(mdm, "llada_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert not out.exists() and torch.load(tmp_path / "resumed.train" / STATE_FILE, weights_only=False)["step"] == 4
    main(args)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(mdm_checkpoint / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_train_mdm_init_from_an_autoregressive_llama_adds_a_mask_token(tmp_path, sums, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "from-ar"
    args = ["--seq-len", "8", "--batch-size", "8", "--steps", "2", "--device", "cpu"]
    main(["train", "mdm", "--data", sums, "--out", str(out), "--init-from", str(tiny_model_dir), *args])
    base, tok = json.loads((tiny_model_dir / "config.json").read_text()), AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == base["vocab_size"]  # added past the vocabulary
    assert config["vocab_size"] == base["vocab_size"] + 1 and config["diffusion_lm"]["mask_token_id"] == len(tok) - 1
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied to the embedding
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(SystemExit, match="char"):
        main(["train", "mdm", "--data", sums, "--out", str(out), f"--init-from={tiny_model_dir}", "--tokenizer=char"])
    with pytest.raises(SystemExit, match="not a masked diffusion LM"):
        main(["train", "dparallel", "--model", str(tiny_model_dir), "--data", sums, "--out", str(tmp_path / "cf")])


def test_trajectories_come_from_the_dparallel_decoder(tmp_path, sums, mdm_checkpoint):
    """The real trajectory source: leapserve's engine with the dparallel decoder, stored and trained on."""
    out = tmp_path / "cf"
    args = ["--gen-length", "4", "--block-length", "2", "--steps", "1", "--batch-size", "4", "--device", "cpu"]
    main(["train", "dparallel", "--model", str(mdm_checkpoint), "--data", sums, "--out", str(out), *args])
    stored = [json.loads(line) for line in (tmp_path / "cf.train" / "trajectories.jsonl").read_text().splitlines()]
    assert len(stored) == 200 and all(len(s["response_ids"]) == 4 for s in stored)
    assert json.loads((out / "config.json").read_text())["diffusion_lm"]["mask_token_id"] == 1


@pytest.mark.parametrize("lora", [0, 4])
def test_train_dparallel_on_fixed_trajectories(lora, tmp_path, mdm_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mdm_checkpoint)
    examples = _digit_sums(24, seed=1)
    data = _write_jsonl(tmp_path / "prompts.jsonl", examples)
    seen = []

    def fake(model, prompts, diffusion_config, device, seed):  # the right answer for even prompts, "0" for odd
        assert model == str(mdm_checkpoint) and diffusion_config["gen_length"] == 4
        for p in prompts:
            i = len(seen)
            seen.append(p)
            answer = examples[i]["response"] if i % 2 == 0 else "0"
            yield tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id, 5, 6]  # cut after EOS

    monkeypatch.setattr(dparallel, "trajectories", fake)
    out = tmp_path / "cf"
    args = [
        "train", "dparallel", "--model", str(mdm_checkpoint), "--data", data, "--out", str(out),
        "--gen-length", "4", "--block-length", "2", "--keep", "correct", "--lora-rank", str(lora),
        "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--checkpoint-every", "1", "--device", "cpu",
    ]  # fmt: skip
    main(args)
    stored = [json.loads(line) for line in (tmp_path / "cf.train" / "trajectories.jsonl").read_text().splitlines()]
    assert len(seen) == len(stored) == 24
    for i, s in enumerate(stored):
        answer = tok.encode(examples[i]["response"] if i % 2 == 0 else "0", add_special_tokens=False)
        assert s["response_ids"] == answer + [tok.eos_token_id] * (4 - len(answer))  # cut after EOS, padded
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((mdm_checkpoint / "config.json").read_text())
    # the base's marker, plus the trajectories' decoding settings as the checkpoint's defaults
    decoding = config["diffusion_lm"].pop("decoding")
    assert config["diffusion_lm"] == base_config["diffusion_lm"]
    assert decoding["gen_length"] == 4 and decoding["rule"] == "entropy"
    card = (out / "README.md").read_text()
    assert "trained on" in card and "| beta | 2 |" in card and str(mdm_checkpoint) in card
    kept = sum(ex["response"] == "0" or i % 2 == 0 for i, ex in enumerate(examples))
    assert f"trained on {kept} (`--keep correct`)" in card
    got, base = load_file(str(out / "model.safetensors")), load_file(str(mdm_checkpoint / "model.safetensors"))
    assert got.keys() == base.keys()  # LoRA merged: plain Llama weights
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    if lora:
        assert changed and all(k.endswith("_proj.weight") for k in changed)
    else:
        assert "model.embed_tokens.weight" in changed
    AutoModelForCausalLM.from_pretrained(out)
    # resume: nothing left to generate or train, the stored trajectories are reused
    monkeypatch.setattr(dparallel, "trajectories", None)
    main(args)
    with pytest.raises(SystemExit, match="other prompts|generated with"):
        main([*args[:6], "--data", _write_jsonl(tmp_path / "other.jsonl", _digit_sums(24, seed=2)), *args[6:]])
