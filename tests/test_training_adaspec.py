"""AdaSPEC training: the losses against hand-computed values, the token filter, resumable training, checkpoint
export, and a tiny end-to-end run (data from a tiny target, reference + draft, the draft serving in the speculative
decoder with greedy output identical to autoregressive decoding)."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from leapserve.decoding import LLM, SamplingParams
from leapserve.drafters.checkpoints import SHARED_WITH_TARGET
from leapserve.training.adaspec import (
    AdaSpecConfig,
    adaspec_loss,
    add_parser,
    default_layers,
    forward_kl,
    select_tokens,
    train_adaspec,
)
from leapserve.training.checkpoint import export_checkpoint
from leapserve.training.data import DataConfig, generate_data
from leapserve.training.loop import STATE_FILE, TrainConfig, train

# ---- losses and the filter ------------------------------------------------------------------------------------------


def test_forward_kl_hand_computed():
    # p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812...; identical distributions: 0.
    target = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    draft = torch.tensor([[5.0, 5.0], [11.0, 12.0]])
    assert forward_kl(target, draft).tolist() == pytest.approx([0.1308120, 0.0], abs=1e-6)


def test_select_tokens_keeps_exactly_the_top_fraction_of_the_batch():
    for n, fraction, kept in [(10, 0.4, 4), (100, 0.4, 40), (20, 0.25, 5), (7, 1.0, 7)]:
        gap = torch.randn(n, generator=torch.Generator().manual_seed(n))
        mask = select_tokens(gap, fraction)
        assert int(mask.sum()) == kept
        assert set(torch.nonzero(mask).flatten().tolist()) == set(gap.topk(kept).indices.tolist())
    # Per batch: the same gap is kept in a batch of small gaps and dropped in a batch of large ones.
    assert select_tokens(torch.tensor([0.5, 0.1, 0.2, 0.0, 0.3]), 0.4)[0]
    assert not select_tokens(torch.tensor([0.5, 1.1, 1.2, 1.0, 1.3]), 0.4)[0]


def test_adaspec_loss_trains_only_the_selected_tokens_normalised_by_all():
    # Two classes; the target is (1/4, 3/4) everywhere. The reference fits tokens 0 and 2 exactly, so the gap is
    # the draft's own KL there; on tokens 1 and 3 the reference is worse than the draft (negative gaps).
    target = torch.tensor([[0.0, math.log(3.0)]]).repeat(4, 1)
    draft = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [0.0, 3.0], [0.0, 0.5]], requires_grad=True)
    reference = torch.tensor([[0.0, math.log(3.0)], [3.0, 0.0], [0.0, math.log(3.0)], [4.0, 0.0]])
    kl = forward_kl(target, draft).detach()
    loss, stats = adaspec_loss(draft, target, reference, fraction=0.5)
    assert loss.item() == pytest.approx((kl[0] + kl[2]).item() / 4, rel=1e-6)  # top 2 of 4 by gap, divided by 4
    assert stats["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
    loss.backward()
    assert draft.grad[[1, 3]].abs().sum() == 0 and draft.grad[[0, 2]].abs().sum() > 0
    distill, _ = adaspec_loss(draft, target, reference, fraction=1.0)  # DistillSpec: every token
    assert distill.item() == pytest.approx(kl.mean().item(), rel=1e-6)


def test_default_layers():
    assert default_layers(30) == [0, 14, 29]
    assert default_layers(2) == [0, 1] and default_layers(1) == [0]


# ---- the loop: interrupt and resume -------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _run(
    out_dir,
    steps: int,
    interrupt_at: int | None = None,
    run: dict | None = None,
    schedule: str = "constant",
    decay_steps: int | None = None,
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    calls = itertools.count(1)

    def loss_fn(i: int) -> torch.Tensor:
        if next(calls) == interrupt_at:
            raise _Interrupt
        x = torch.full((16, 4), float(i % 5)) + torch.randn(16, 4)  # uses (and so tests) the restored RNG
        return ((model(x) - i % 3) ** 2).mean()

    cfg = TrainConfig(
        steps=steps,
        lr=1e-2,
        warmup_steps=2,
        checkpoint_every=2,
        seed=1,
        device="cpu",
        lr_schedule=schedule,
        decay_steps=decay_steps,
    )
    train(model, loss_fn, itertools.count(), cfg, out_dir, run=run)
    return model


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    want = _run(tmp_path / "straight", 7)
    with pytest.raises(_Interrupt):
        _run(tmp_path / "resumed", 7, interrupt_at=6)  # the state of step 4 is on disk
    assert torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=False)["step"] == 4
    got = _run(tmp_path / "resumed", 7)
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different run"):
        _run(tmp_path / "resumed", 8, run={"batch size": 3})


def test_lr_schedules_warm_up_then_hold_or_decay_to_a_tenth():
    constant = TrainConfig(steps=11, lr=1.0, warmup_steps=2)
    cosine = TrainConfig(steps=11, lr=1.0, warmup_steps=2, lr_schedule="cosine")
    assert [constant.lr_factor(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    factors = [cosine.lr_factor(s) for s in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # warmup, then the peak at the first decayed step
    assert factors[6] == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert factors[10] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    # warmup, stable, decay: the peak held until the last 5 steps, which decay as a 5-step cosine would
    held = TrainConfig(steps=11, lr=1.0, warmup_steps=2, lr_schedule="cosine", decay_steps=5)
    short = TrainConfig(steps=5, lr=1.0, lr_schedule="cosine")
    assert [held.lr_factor(s) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [held.lr_factor(s) for s in range(6, 11)] == pytest.approx([short.lr_factor(s) for s in range(5)])
    with pytest.raises(ValueError, match="lr-schedule"):
        TrainConfig(lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="decay-steps must be in"):
        TrainConfig(steps=4, lr_schedule="cosine", decay_steps=5).validate()
    with pytest.raises(ValueError, match="needs --lr-schedule cosine"):
        TrainConfig(steps=4, decay_steps=2).validate()


def test_interrupted_cosine_training_resumes_to_the_same_weights(tmp_path):
    want = _run(tmp_path / "straight", 7, schedule="cosine")
    with pytest.raises(_Interrupt):
        _run(tmp_path / "resumed", 7, interrupt_at=6, schedule="cosine")
    got = _run(tmp_path / "resumed", 7, schedule="cosine")
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(want.parameters()), next(_run(tmp_path / "constant", 7).parameters()))


def test_a_finished_constant_run_resumes_into_its_decay(tmp_path):
    """Warmup-stable-decay in two runs: 4 constant steps, then 3 more decaying, equal 7 steps run straight."""
    want = _run(tmp_path / "straight", 7, schedule="cosine", decay_steps=3)
    _run(tmp_path / "resumed", 4)
    got = _run(tmp_path / "resumed", 7, schedule="cosine", decay_steps=3)
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(want.parameters()), next(_run(tmp_path / "constant", 7).parameters()))


def test_export_is_atomic_and_never_replaces_other_directories(tmp_path):
    out = export_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2, 2)}, {"a": 1}, "# card\n")
    export_checkpoint(out, {"w": torch.zeros(3)}, {"a": 2}, "# card 2\n")
    assert load_file(str(out / "model.safetensors"))["w"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old directories left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        export_checkpoint(tmp_path / "mine", {"w": torch.ones(1)}, {}, "")


# ---- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("adaspec-data")
    return generate_data(
        DataConfig(model=str(tiny_model_dir), out=str(out), num_prompts=8, max_tokens=24, shard_size=4, device="cpu")
    )


def test_adaspec_end_to_end_draft_serves_with_greedy_equal_to_autoregressive(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "draft"
    cfg = AdaSpecConfig(
        model=str(tiny_model_dir),
        data=str(tiny_data),
        out=str(out),
        init_layers=[1],
        eval_prompts=2,
        eval_max_tokens=8,
        num_speculative_tokens=3,
        train=TrainConfig(steps=3, batch_size=2, max_len=256, checkpoint_every=2, device="cpu"),
    )
    train_adaspec(cfg)
    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config[SHARED_WITH_TARGET] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert config["num_hidden_layers"] == 1 and config["leapserve_init_layers"] == [1]
    assert not set(config[SHARED_WITH_TARGET]) & set(weights) and all(
        w.dtype == torch.float16 for w in weights.values()
    )
    card = (out / "README.md").read_text()
    assert "mean_acceptance_length" in card and "speedup" in card
    assert "| steps | 3 |" in card and "| batch size | 5 |" in card  # ceil(2 / 0.4): the paper's token budget
    assert (tmp_path / "draft.train" / "reference" / "config.json").is_file()
    assert torch.load(tmp_path / "draft.train" / "draft-state" / STATE_FILE, weights_only=False)["step"] == 3

    prompts = ["The capital of France is", "def add(a, b):", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [
        o.outputs[0].token_ids
        for o in LLM(str(tiny_model_dir), kv_cache_tokens=1024).generate(prompts, params, use_tqdm=False)
    ]
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_tokens=1024,
        speculative_config={"method": "draft_model", "model": str(out), "num_speculative_tokens": 3},
    )
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    draft = llm.engine.decoder.drafter.runner.model
    target = llm.engine.runner.model
    assert draft.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert draft.lm_head.weight is target.lm_head.weight


def test_cli_distillspec_baseline_and_bad_flags(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["adaspec", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--device", "cpu"]
    monkeypatch.chdir(tmp_path)  # a relative --out, served through a relative speculative_config path
    args = parser.parse_args(
        base
        + [
            "--out",
            "distill",
            "--stage",
            "draft",
            "--no-filter",
            "--init-layers",
            "0",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-prompts",
            "0",
        ]
    )
    assert args.filter_fraction == 1.0
    args.handler(args)
    assert "DistillSpec" in (tmp_path / "distill" / "README.md").read_text()
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_tokens=1024,
        speculative_config={"method": "draft_model", "model": "distill", "num_speculative_tokens": 2},
    )
    assert (
        len(llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0].token_ids)
        == 5
    )
    with pytest.raises(ValueError, match="needs --reference"):
        args = parser.parse_args(base + ["--out", "x", "--stage", "draft"])
        args.handler(args)
    with pytest.raises(ValueError, match="--init-layers"):
        args = parser.parse_args(base + ["--out", "x", "--init-layers", "0,7", "--eval-prompts", "0"])
        args.handler(args)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        args = parser.parse_args(base[:3] + ["--data", str(tmp_path), "--out", "x"])
        args.handler(args)
