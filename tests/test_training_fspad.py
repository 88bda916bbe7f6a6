"""FSPAD training: the losses by hand, the data shards (features, resume), and a tiny drafter trained end to end
and used losslessly by the speculative decoder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from leapserve.decoding import LLM, SamplingParams
from leapserve.drafters.fspad_model import FSPADConfig, FSPADModel
from leapserve.training.data import DataConfig, generate_data, read_sequences
from leapserve.training.export import export_eagle
from leapserve.training.fspad import FSPADTrainConfig, feature_loss, frequent_tokens, soft_cross_entropy, train_fspad
from leapserve.training.loop import TrainConfig


def test_feature_loss_by_hand():
    pred = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    # SmoothL1 (beta 1): |x| < 1 -> x^2 / 2, else |x| - 1/2. Position 0: (0.125 + 1.5) / 2; position 1 masked out.
    mask = torch.tensor([[1.0, 0.0]])
    assert feature_loss(pred, target, mask).item() == pytest.approx((0.125 + 1.5) / 2)
    mask = torch.tensor([[1.0, 1.0]])  # position 1: (0.5 + 0.5) / 2
    assert feature_loss(pred, target, mask).item() == pytest.approx(((0.125 + 1.5) / 2 + 0.5) / 2)


def test_soft_cross_entropy_by_hand():
    draft = torch.tensor([[[0.0, math.log(3.0)]]])  # q = (1/4, 3/4)
    target = torch.tensor([[[math.log(2.0), 0.0]]])  # p = (2/3, 1/3)
    expected = -(2 / 3 * math.log(1 / 4) + 1 / 3 * math.log(3 / 4))
    assert soft_cross_entropy(draft, target, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(draft, target, torch.zeros(1, 1)).item() == 0.0


def test_frequent_tokens_keeps_the_most_common_and_eos():
    from leapserve.training.data import TrainSequence

    ids = torch.tensor([5, 5, 5, 7, 7, 9, 1])
    seqs = [TrainSequence(ids, torch.ones(7, dtype=torch.bool), None)]
    assert frequent_tokens(seqs, 2, always=[2]).tolist() == [2, 5]  # EOS first, then the most common
    assert frequent_tokens(seqs, 3, always=[2]).tolist() == [2, 5, 7]
    assert frequent_tokens(seqs, 10, always=[2]).tolist() == [1, 2, 5, 7, 9]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("fspad-data") / "data"
    generate_data(
        DataConfig(model=str(tiny_model_dir), out=str(out), num_prompts=12, shard_size=4, max_tokens=24, device="cpu")
    )
    return out


def test_shards_hold_the_targets_features_and_resume(tiny_data, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["num_shards"] == 3 and meta["num_sequences"] == 12
    seqs = read_sequences(tiny_data)
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for s in seqs[:3]:
        assert s.loss_mask.any() and not s.loss_mask[0]
        with torch.no_grad():
            logits = target(s.input_ids[None]).logits[0]
        from_features = target.lm_head(s.features.float())
        torch.testing.assert_close(from_features, logits, atol=2e-2, rtol=2e-2)
        # greedy answers: each generated token is the argmax after the previous position
        resp = s.loss_mask.nonzero().flatten()
        assert torch.equal(logits[resp - 1].argmax(-1), s.input_ids[resp])
    # resume: a run asked for 4 prompts, then extended to 12, writes the same shards as one run
    partial = tmp_path / "partial"
    generate_data(
        DataConfig(
            model=str(tiny_model_dir), out=str(partial), num_prompts=4, shard_size=4, max_tokens=24, device="cpu"
        )
    )
    first = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    generate_data(
        DataConfig(
            model=str(tiny_model_dir), out=str(partial), num_prompts=12, shard_size=4, max_tokens=24, device="cpu"
        )
    )
    assert (partial / "shard-00000.safetensors").stat().st_mtime_ns == first
    for i in range(3):
        a, b = (
            load_file(str(partial / f"shard-0000{i}.safetensors")),
            load_file(str(tiny_data / f"shard-0000{i}.safetensors")),
        )
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
    assert not list(partial.glob("*.tmp"))


def test_data_from_a_bf16_target_holds_its_features_and_keeps_its_dtype(tiny_model_dir, tmp_path):
    """`--dtype bfloat16`: the answers and features come from the target in bf16 (about twice as fast on an AMX
    CPU), stored as float16 as ever; resuming the directory in another dtype is refused."""
    from transformers import AutoModelForCausalLM

    cfg = DataConfig(
        model=str(tiny_model_dir), out=str(tmp_path / "d"), num_prompts=4, shard_size=4, max_tokens=12, dtype="bfloat16"
    )
    generate_data(cfg)
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["config"]["dtype"] == "bfloat16"
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    for s in read_sequences(tmp_path / "d"):
        assert s.features is not None and s.features.dtype == torch.float16
        with torch.no_grad():
            hidden = target.model(input_ids=s.input_ids[None]).last_hidden_state[0]
        torch.testing.assert_close(s.features.float(), hidden.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="--dtype 'bfloat16'"):
        generate_data(DataConfig(**{**vars(cfg), "num_prompts": 8, "dtype": "float32"}))


def test_training_reads_several_data_directories_in_order(tiny_data, tiny_model_dir, tmp_path):
    """`--data A,B`: A's sequences then B's, a model card paragraph on each, the run resumable only on the same
    pair; a directory made by another model is refused before training."""
    second = tmp_path / "second"
    generate_data(
        DataConfig(
            model=str(tiny_model_dir), out=str(second), num_prompts=4, shard_size=4, max_tokens=12, seed=1, device="cpu"
        )
    )
    both = f"{tiny_data},{second}"
    one_by_one = read_sequences(tiny_data) + read_sequences(second)
    assert [s.input_ids.tolist() for s in read_sequences(both)] == [s.input_ids.tolist() for s in one_by_one]
    out = tmp_path / "drafter"
    cfg = FSPADTrainConfig(
        model=str(tiny_model_dir),
        data=both,
        out=str(out),
        eval_prompts=0,
        train=TrainConfig(steps=2, batch_size=4, max_len=64, checkpoint_every=10, device="cpu"),
    )
    train_fspad(cfg)
    card = (out / "README.md").read_text()
    assert f"`{tiny_data}`: 12 sequences" in card and f"`{second}`: 4 sequences" in card
    assert card.count("leapserve train data") == 2  # each directory's recipe
    with pytest.raises(ValueError, match=r"settings changed, \(was, now\): \{'data'"):  # the state is the pair's
        train_fspad(FSPADTrainConfig(**{**vars(cfg), "data": str(second)}))
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((second / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "hidden_size": meta["hidden_size"] + 1}))
    with pytest.raises(ValueError, match=f"--data {other} was made by a model with hidden_size"):
        train_fspad(FSPADTrainConfig(**{**vars(cfg), "data": f"{second},{other}", "out": str(tmp_path / "x")}))
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        read_sequences(f"{second},{tmp_path / 'missing'}")


@pytest.mark.parametrize("variant", ["fspad", "no-fs", "no-pad", "no-fs-no-pad"])
def test_trained_tiny_drafter_is_lossless_in_the_speculative_decoder(variant, tiny_data, tiny_model_dir, tmp_path):
    out = tmp_path / "drafter"
    cfg = FSPADTrainConfig(
        model=str(tiny_model_dir),
        data=str(tiny_data),
        out=str(out),
        feature_sampling="no-fs" not in variant,
        partial_alignment="no-pad" not in variant,
        draft_vocab_size=0 if variant == "fspad" else 2000,
        eval_prompts=2 if variant == "fspad" else 0,  # the model card's acceptance on both evaluation sets
        eval_max_tokens=6,
        train=TrainConfig(steps=30, lr=3e-3, batch_size=4, max_len=64, checkpoint_every=10, device="cpu"),
    )
    train_fspad(cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["leapserve_drafter"] == "fspad" and config["partial_alignment"] == ("no-pad" not in variant)
    assert "embed" not in " ".join(load_file(str(out / "model.safetensors")))  # the target's, not stored
    card = (out / "README.md").read_text()
    assert "## Command" in card
    for name in ("mixed", "handwritten"):
        assert (f"| `{name}` num_prompts | 2 |" in card) == (variant == "fspad")
    prompts = [[{"role": "user", "content": p}] for p in ("What is 2 + 2?", "Name a colour.", "Say hi")]
    params = SamplingParams(temperature=0, max_tokens=20)
    plain = LLM(str(tiny_model_dir), decoder="autoregressive", kv_cache_tokens=2048)
    expected = [o.outputs[0].token_ids for o in plain.chat(prompts, params, use_tqdm=False)]
    eagle = export_eagle(out, str(tiny_model_dir), tmp_path / "eagle")
    eagle_config = json.loads((eagle / "config.json").read_text())
    assert eagle_config["architectures"] == ["EagleFSPADLlamaForCausalLM"]
    assert ("d2t" in load_file(str(eagle / "model.safetensors"))) == (config["draft_vocab_size"] < 49152)
    drafts = []
    for spec in (  # fixed trees: adaptive speculation's choices follow step times, and two runs' drafts would differ
        {"method": "fspad", "model": str(out), "tree": {"depth": 3, "top_k": 3, "total_tokens": 8}},
        {"method": "fspad", "model": str(eagle), "tree": {"depth": 3, "top_k": 3, "total_tokens": 8}},
        {"method": "fspad", "model": str(out), "num_speculative_tokens": 3, "layout": "padded"},
    ):
        llm = LLM(str(tiny_model_dir), speculative_config={**spec, "adaptive": False}, kv_cache_tokens=2048)
        outs = llm.chat(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        drafts.append([(o.metrics.draft_tokens, o.metrics.accepted_tokens) for o in outs])
        assert sum(o.metrics.draft_tokens for o in outs) > 0
    assert drafts[0] == drafts[1]  # the EAGLE-layout export drafts exactly as the original
    # Penalties make the drafter process each node's logits on its own (over the whole vocabulary, a reduced
    # draft vocabulary mapped back): still lossless.
    penalized = SamplingParams(temperature=0, max_tokens=20, presence_penalty=1.5, frequency_penalty=0.5)
    want = LLM(str(tiny_model_dir), kv_cache_tokens=2048).chat(prompts, penalized, use_tqdm=False)
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_tokens=2048,
        speculative_config={
            "method": "fspad",
            "model": str(out),
            "tree": {"depth": 3, "top_k": 3, "total_tokens": 8},
            "adaptive": False,
        },
    )
    outs = llm.chat(prompts, penalized, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    assert sum(o.metrics.draft_tokens for o in outs) > 0


def test_unrolled_steps_equal_the_drafting_chain():
    """Step s of the training-time test at position i computes what drafting computes s levels deep: the drafter
    run causally over the context's target features up to i-s+1, then its own predicted features."""
    torch.manual_seed(0)
    config = FSPADConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        target_vocab_size=50,
        draft_vocab_size=50,
    )
    model = FSPADModel(config).double().eval()
    length = 9
    features, embeddings = (torch.randn(2, length, 32, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(length).expand(2, -1)
    with torch.no_grad():
        steps = model.unrolled(features, embeddings, positions, 3)
        plain = model(features, embeddings, positions)
        for a, b in zip(steps[0], plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for s in (2, 3):
            for i in range(s - 1, length):
                inputs = features[:, : i - s + 2]  # the context, its last position the chain's root
                while inputs.shape[1] <= i:  # one level deeper: the feature predicted at the last position
                    n = inputs.shape[1]
                    predicted = model(inputs, embeddings[:, :n], positions[:, :n])[1][:, -1:]
                    inputs = torch.cat([inputs, predicted], dim=1)
                want = model(inputs, embeddings[:, : i + 1], positions[:, : i + 1])
                for got, expected in zip(steps[s - 1], want):
                    torch.testing.assert_close(got[:, i], expected[:, i])
        assert not torch.allclose(steps[1][1][:, 3], plain[1][:, 3])  # a drafted input differs from the target's


def test_training_resumes_a_drafter_and_unrolls(tiny_data, tiny_model_dir, tmp_path):
    """`init` starts from a drafter's weights (refused where its configuration differs from the flags); `unroll`
    trains deeper steps, reported per step and on the model card."""
    base = TrainConfig(steps=10, lr=3e-3, batch_size=4, max_len=64, checkpoint_every=10, device="cpu")
    first = train_fspad(
        FSPADTrainConfig(
            model=str(tiny_model_dir), data=str(tiny_data), out=str(tmp_path / "a"), eval_prompts=0, train=base
        )
    )
    still = TrainConfig(steps=1, lr=1e-12, batch_size=4, max_len=64, checkpoint_every=10, device="cpu")
    second = train_fspad(
        FSPADTrainConfig(
            model=str(tiny_model_dir),
            data=str(tiny_data),
            out=str(tmp_path / "b"),
            init=str(first),
            unroll=3,
            eval_prompts=0,
            train=still,
        )
    )
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=0, atol=1e-6)
    card = (second / "README.md").read_text()
    assert "| drafting steps per position | 3 |" in card and f"| started from | {first} |" in card
    assert "val_top1_s2" in card and "val_top1_s3" in card
    with pytest.raises(ValueError, match="--init"):
        train_fspad(
            FSPADTrainConfig(
                model=str(tiny_model_dir),
                data=str(tiny_data),
                out=str(tmp_path / "c"),
                init=str(first),
                feature_sampling=False,
                eval_prompts=0,
                train=still,
            )
        )
    with pytest.raises(ValueError, match="--unroll"):
        train_fspad(FSPADTrainConfig(model=str(tiny_model_dir), data=str(tiny_data), out=str(tmp_path / "d"), unroll=0))
