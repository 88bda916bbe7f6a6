"""The drafters shipped for SmolLM2-135M-Instruct: lossless in every layout and tree, and actually trained (they
accept far more than a random drafter would)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import DEFAULT_MODEL
from leapserve.decoding.model_loader import cache_dir
from leapserve.kernels import cpu_ops
from leapserve.prompts import load

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
FSPAD = CHECKPOINTS / "smollm2-135m-instruct-fspad"
ADASPEC = CHECKPOINTS / "smollm2-135m-instruct-adaspec"
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Tom has 12 apples and buys 7 more. How many apples does he have?",
    "Give me three facts about the moon.",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    llm = LLM(DEFAULT_MODEL, decoder="autoregressive", kv_cache_tokens=8192)
    outs = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=40),
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("path", [FSPAD, ADASPEC], ids=["fspad", "adaspec"])
def test_shipped_drafter_is_small_and_documented(path):
    weights = path / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 32 * 2**20
    card = (path / "README.md").read_text()
    assert "## Command" in card and "mean_acceptance_length" in card
    assert json.loads((path / "config.json").read_text())


@pytest.mark.parametrize(
    "spec",
    [
        {
            "method": "fspad",
            "model": str(FSPAD),
            "tree": {"depth": 5, "top_k": 8, "total_tokens": 32},
            "dtype": "float32",
        },
        {"method": "fspad", "model": str(FSPAD), "num_speculative_tokens": 4, "layout": "padded", "dtype": "bfloat16"},
        {"method": "draft_model", "model": str(ADASPEC), "num_speculative_tokens": 3},
    ],
    ids=["fspad-tree", "fspad-chain-padded", "adaspec-chain"],
)
def test_shipped_drafter_greedy_equals_autoregressive(spec, expected):
    llm = LLM(DEFAULT_MODEL, speculative_config={**spec, "adaptive": False}, kv_cache_tokens=8192)
    outs = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=40),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == expected
    if spec["method"] == "fspad":  # the drafter's weights, LM head rows and cache in its own dtype
        drafter, dtype = llm.engine.decoder.drafter, getattr(torch, spec["dtype"])
        assert {p.dtype for p in drafter.model.parameters()} == {dtype}
        assert drafter.head.weight.dtype == drafter.cache.k[0].dtype == dtype
    forwards = sum(o.metrics.target_forwards for o in outs)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    if spec["method"] == "fspad":  # a trained drafter, well above one token per target forward: measured 3.76 / 2.51
        assert (forwards + accepted) / forwards > (3.4 if "tree" in spec else 2.3)


@pytest.mark.parametrize("max_num_seqs", [1, 16])
def test_shipped_fspad_greedy_equals_autoregressive_in_bf16_where_the_gemms_take_a_tree(max_num_seqs):
    """A bf16 target, the CPU tree of eight: greedy speculation gives plain decoding's tokens, where the GEMMs' own
    code takes the rows of a step and each row's sums do not depend on the rows beside it: one request at a time
    where it takes a tree's nine rows (AMX's tiles, a k-major weight), 16 at once where it takes every row count
    (k-major). bf16 logits tie often (a 0.125 step at 16), so a last-bit difference would show here: before tree
    nodes got their decoded bits, the first of these prompts parted at its 61st token; at 16 requests, through
    oneDNN beyond 16 rows, the first parted."""
    cpu_ops.load(cache_dir() / "extensions")
    rows = cpu_ops.own_rows(torch.bfloat16, 576, 1536)
    if rows < 9 or (max_num_seqs > 1 and rows < 4096):
        pytest.skip(f"bf16: steps of {max_num_seqs} request(s) send rows to oneDNN here, whose sums vary by count")
    chats = load("mixed", num_prompts=max(8, max_num_seqs))
    prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in chats]
    params = SamplingParams(temperature=0, max_tokens=96)
    spec = {"method": "fspad", "model": str(FSPAD), "tree": {"depth": 4, "top_k": 4, "total_tokens": 8}}
    outs = []
    for kwargs in ({"decoder": "autoregressive"}, {"speculative_config": {**spec, "adaptive": False}}):
        llm = LLM(DEFAULT_MODEL, dtype="bfloat16", max_num_seqs=max_num_seqs, kv_cache_tokens=4096, **kwargs)
        outs.append(llm.chat(prompts, params, use_tqdm=False))
    assert [o.outputs[0].token_ids for o in outs[1]] == [o.outputs[0].token_ids for o in outs[0]]
    assert sum(o.metrics.accepted_tokens for o in outs[1]) > 0


def test_the_default_model_speculates_by_default_with_its_shipped_drafter(expected):
    """With neither a decoder nor a speculative config, the default model decodes with its shipped FSPAD drafter,
    named (resolved among the package's checkpoints), and the device's tree; greedy output = plain decoding."""
    llm = LLM(DEFAULT_MODEL, kv_cache_tokens=8192)
    tree = {"depth": 4, "top_k": 4, "total_tokens": 8}  # this machine's: a CPU
    assert llm.engine.decoder_name == "speculative"
    lookup = {"tokens": 8}
    assert llm.engine.config.speculative_config == {
        "method": "fspad",
        "model": FSPAD.name,
        "tree": tree,
        "lookup": lookup,
    }
    outs = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=40),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.metrics.num_drafts for o in outs) > 0


def test_the_fspad_drafters_dtype_defaults_to_bf16_under_an_fp32_target_where_the_cpu_computes_bf16(monkeypatch):
    from leapserve.drafters.fspad import draft_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert draft_dtype("float32", torch.bfloat16, cpu) == torch.float32  # as named
    assert draft_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert draft_dtype("auto", torch.float32, cuda) == torch.float32  # a GPU: the target's
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert draft_dtype("auto", torch.float32, cpu) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert draft_dtype("auto", torch.float32, cpu) == torch.float32


def test_shipped_fspad_keeps_its_acceptance_on_handwritten_prompts():
    """A floor on the shipped FSPAD drafter's mean acceptance length on requests written by hand (never trained
    on), with the default CPU tree: a regression in drafting, verification or training fails here. Measured
    2.39 on all 36 prompts at 64 tokens, 2.90 on the generated `mixed` test split (2026-12-05); this subset of 12 at
    48 tokens measured 2.33 (2.37 with the drafter in bf16, the default on CPUs with bf16 matmuls), the floor sits a
    little under both."""
    from leapserve.benchmarks.bench_offline import prompt_token_ids
    from leapserve.prompts import load

    spec = {"method": "fspad", "model": str(FSPAD), "tree": {"depth": 4, "top_k": 4, "total_tokens": 8}}
    llm = LLM(DEFAULT_MODEL, speculative_config={**spec, "adaptive": False}, kv_cache_tokens=8192)
    prompts = prompt_token_ids(llm.tokenizer, load("handwritten", "test", 12, 0), 0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    drafts = sum(o.metrics.num_drafts for o in outs)
    mean_acceptance_length = 1 + accepted / drafts
    assert mean_acceptance_length >= 2.2, f"mean acceptance length {mean_acceptance_length:.3f} (measured 2.33-2.37)"


def test_a_lookup_chain_in_the_tree_accepts_more_where_answers_quote_their_prompts():
    """The shipped drafter's fixed CPU tree with and without a prompt-lookup chain merged in, on summarisation
    prompts (their answers quote the text): the same tokens as plain decoding, and far more of them accepted per
    step with the chain. Measured 2.22 without it and 3.36 with it (2026-12-07)."""
    from leapserve.benchmarks.bench_offline import prompt_token_ids

    spec = {"method": "fspad", "model": str(FSPAD), "tree": {"depth": 4, "top_k": 4, "total_tokens": 8}}
    llm = LLM(DEFAULT_MODEL, decoder="autoregressive", kv_cache_tokens=8192)
    prompts = prompt_token_ids(llm.tokenizer, load("summarization", "test", 8, 0), 0)
    params = SamplingParams(temperature=0, max_tokens=48)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    acceptance = []
    for extra in ({}, {"lookup": {"tokens": 8}}):
        llm = LLM(DEFAULT_MODEL, speculative_config={**spec, **extra, "adaptive": False}, kv_cache_tokens=8192)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        accepted, drafts = (sum(getattr(o.metrics, k) for o in outs) for k in ("accepted_tokens", "num_drafts"))
        acceptance.append(1 + accepted / drafts)
    assert acceptance[1] >= acceptance[0] + 0.8, f"mean acceptance length without and with the chain: {acceptance}"


def test_fspad_catch_up_window_hides_old_pairs_and_stays_lossless(expected, monkeypatch):
    """With catch-ups of at most 16 pairs over the batch (4 per sequence here), and drafting on every third step
    only (plain steps between leave a backlog), no drafter forward runs more than that, the pairs skipped stay
    hidden from every later drafter forward (several holes per sequence), and greedy output still equals plain
    decoding."""
    from leapserve.decoding.observe import StepObserver
    from leapserve.drafters import fspad

    class DraftForwards(StepObserver):
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def on_forward(self, model: str, num_tokens: int) -> None:
            if model == "draft":
                self.sizes.append(num_tokens)

    monkeypatch.setattr(fspad, "CATCH_UP_PAIRS", 16)
    monkeypatch.setattr(fspad, "CATCH_UP_WINDOW", 2)
    forwards = DraftForwards()
    spec = {"method": "fspad", "model": str(FSPAD), "tree": {"depth": 4, "top_k": 4, "total_tokens": 8}}
    llm = LLM(DEFAULT_MODEL, speculative_config=spec, kv_cache_tokens=8192, observers=[forwards])
    decoder = llm.engine.decoder
    steps = iter(range(1 << 30))
    monkeypatch.setattr(decoder.selector, "choose", lambda n, timeable=True: next(steps) % 3 == 2)
    monkeypatch.setattr(decoder.selector, "record", lambda *args: None)
    outs = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=40),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.metrics.num_drafts for o in outs) >= 10
    # a catch-up forward carries at most 4 pairs per sequence; tree levels carry at most top_k * (depth - 1) nodes
    assert forwards.sizes and max(forwards.sizes) <= len(PROMPTS) * 12
    states = list(decoder.drafter._state.values())
    assert max(len(s.holes) for s in states) >= 2


def test_fspad_feature_state_keeps_the_last_pairs_and_merges_adjacent_holes():
    import torch

    from leapserve.drafters.fspad import _FeatureState

    state = _FeatureState()
    for n in (5, 3, 2):  # a prompt chunk, then two steps' features
        state.pending.append(torch.arange(state.num_features, state.num_features + n).float()[:, None])
        state.num_features += n
    state.keep_last(4)
    assert (state.computed, state.holes) == (6, [(0, 6)])
    assert torch.cat(state.pending)[:, 0].tolist() == [6, 7, 8, 9]
    state.keep_last(2)  # contiguous with the last hole: one hole
    assert (state.computed, state.holes) == (8, [(0, 8)])
    state.keep_last(5)  # fewer pending than that: nothing to hide
    assert (state.computed, state.holes, state.num_features) == (8, [(0, 8)], 10)
