"""The speculative decoder: greedy output identical to autoregressive decoding and to transformers' generate
(n-gram and draft-model drafters, chains, static and dynamic trees, packed and padded layouts, batches of
1 to 8), lossless sampling (exact target distribution of the first two tokens), configuration, and the server.
One module (over 400 lines): the decoder's oracles, read together. Adaptive speculation: `test_adaptive.py`."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import save_tiny_llama
from drafter_plugins import tampered_method
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import DEFAULT_MODEL, SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.prompt_lookup import NgramIndex, PromptLookup, merge_chain
from leapserve.decoding.sampler import row_argmax, target_probs
from leapserve.decoding.tree import chunk_layout, tree_children, tree_depths
from test_server import API_KEY, MODEL, metric, running_server, scrape

SMOLLM2 = DEFAULT_MODEL
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "Once upon a time, in a land far away, there lived a dragon who",
    "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat",
    "Explain why the sky is blue.",
    "A B C D E F G",
    "List three colors:",
]


# ---- units -----------------------------------------------------------------------------------------------------


def test_tree_metadata():
    #        root(0)
    #       /      \
    #      1        2
    #     / \       |
    #    3   4      5
    parents = [0, 0, 1, 1, 2]
    assert tree_depths(parents) == [0, 1, 1, 2, 2, 2]
    assert tree_children(parents) == [[1, 2], [3, 4], [5], [], [], []]
    mask, offsets = chunk_layout(2, parents, num_pad=1)  # one prefix token before the root, one pad row
    assert offsets == [0, 1, 2, 2, 3, 3, 3, 2]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]  # node 4: prefix, root, 1, 4
    assert mask[6].tolist() == [True, True, False, True, False, False, True, False]  # node 5: prefix, root, 2, 5
    assert mask[7].tolist() == [True, True, False, False, False, False, False, True]  # pad: prefix, root, itself
    assert mask[0].tolist() == [True] + [False] * 7


def lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    return NgramIndex(n_min, n_max).lookup(tokens, k)


def test_ngram_lookup():
    assert lookup([1, 2, 3, 4, 1, 2], 1, 3, 3) == [3, 4, 1]
    assert lookup([5, 1, 9, 1, 2, 7, 1, 2], 1, 2, 2) == [7, 1]  # the longest n-gram wins over a later 1-gram
    assert lookup([1, 2, 3], 1, 2, 4) == []
    assert lookup([4, 4], 1, 3, 2) == [4]  # the suffix's own earlier position counts, its continuation known


def scanned_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """The definition, by a scan of the whole context: the longest suffix first, its latest earlier occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + k]
    return []


@pytest.mark.parametrize("n_min, n_max", [(1, 4), (2, 4), (3, 3)])
def test_ngram_index_follows_a_growing_sequence_as_a_scan_would(n_min, n_max):
    rng = random.Random(n_min * 10 + n_max)
    for _ in range(20):
        index, tokens = NgramIndex(n_min, n_max), [rng.randrange(4)]
        while len(tokens) < 80:
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 5))]  # a step commits one token or several
            k = rng.randint(1, 8)
            assert index.lookup(tokens, k) == scanned_lookup(tokens, n_min, n_max, k)
    assert index.lookup([0, 1, 0], 8) == scanned_lookup([0, 1, 0], n_min, n_max, 8)  # another, shorter list


def test_merge_chain_ranks_the_chain_against_the_drafters_scores():
    # the drafter's tree: 5 (-0.1) -> 7 (-0.5), 9 (-2.0); 2 (-1.0); a chain 5, 6, 8 from the root
    tree = DraftTree(tokens=[5, 2, 7, 9], parents=[0, 0, 1, 1], q=[None] * 4, scores=[-0.1, -1.0, -0.5, -2.0])
    # a = 0.5: the chain's 6 (-1.39) after the drafter's 7 and 2; its 5 is the drafter's
    merged, chain_nodes = merge_chain(tree, [5, 6, 8], math.log(0.5), budget=4)
    assert (merged.tokens, merged.parents, chain_nodes) == ([5, 7, 2, 6], [0, 1, 0, 1], [(1, False), (4, True)])
    # a = 0.9: the chain (-0.1, -0.21, -0.32) before the drafter's 7
    merged, chain_nodes = merge_chain(tree, [5, 6, 8], math.log(0.9), budget=4)
    assert (merged.tokens, merged.parents, chain_nodes) == (
        [5, 6, 8, 7],
        [0, 1, 2, 1],
        [(1, False), (2, True), (3, True)],
    )
    assert merged.scores == sorted(merged.scores, reverse=True) and merged.q == [None] * 4
    # a drafter that gives no scores keeps its nodes first; the chain takes what the budget leaves
    unscored = DraftTree(tree.tokens, tree.parents, tree.q)
    merged, chain_nodes = merge_chain(unscored, [5, 6, 8], math.log(0.9), budget=5)
    assert (merged.tokens, merged.parents, chain_nodes) == ([5, 2, 7, 9, 6], [0, 0, 1, 1, 1], [(1, False), (5, True)])


class Tokens:
    """A sequence as prompt lookup reads it: its tokens."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids


def test_prompt_lookup_learns_how_far_its_chains_are_accepted():
    lookup = PromptLookup(tokens=4, ngram_min=2, ngram_max=4)
    seq, other = Tokens([1, 2, 3, 4, 1, 2]), Tokens([8, 9])
    assert lookup.acceptance(seq) == 0.5  # before any chain is verified
    (tree,) = lookup.merge([seq], [4], [DraftTree([], [], [])])
    assert tree.tokens == [3, 4, 1, 2]
    lookup.record(seq, [1, 2])  # two of the chain's tokens taken, the third tried
    overall = (0.99 * 1 + 2) / (0.99 * 2 + 3)
    assert lookup.acceptance(other) == pytest.approx(overall)
    assert lookup.acceptance(seq) == pytest.approx((2 + 4 * overall) / (3 + 4))
    lookup.record(seq, [1, 2, 3])  # no chain in the last tree any more: nothing changes
    assert lookup.acceptance(other) == pytest.approx(overall)
    # a chain whose tokens are all the drafter's own nodes tells nothing about chains
    (tree,) = lookup.merge([seq], [2], [DraftTree([3, 4], [0, 1], [None, None], [-0.1, -0.2])])
    lookup.record(seq, [1])
    assert tree.tokens == [3, 4] and lookup.acceptance(other) == pytest.approx(overall)
    sampled = DraftTree([7], [0], [torch.ones(10) / 10])  # a draft drawn from q is left as it is
    assert lookup.merge([seq], [4], [sampled]) == [sampled]
    assert lookup.merge([seq], [0], [DraftTree([], [], [])])[0].tokens == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, 'needs "model"'),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": "4"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "layout": "ragged"}, "layout"),
        ({"method": "ngram", "num_speculative_tokens": 2, "tree": [2, 1]}, "chains only"),
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown keys"),
        ({"method": "draft_model", "model": "x", "tree": {"depth": 0}}, "dynamic tree"),
        ({"method": "fspad", "model": "x", "tree": [2], "dtype": "float64"}, "dtype must be one of"),
        ({"method": "draft_model", "model": "x", "tree": [2], "dtype": "bfloat16"}, "dtype is the fspad drafter's"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookup": {"tokens": 2}}, "trees of another method"),
        ({"method": "fspad", "model": "x", "tree": [2], "lookup": 4}, "lookup is an object"),
        ({"method": "fspad", "model": "x", "tree": [2], "lookup": {"ngram_min": 2}}, "tokens required"),
        ({"method": "fspad", "model": "x", "tree": [2], "lookup": {"tokens": 4, "ngram_min": 3, "ngram_max": 2}}, "<="),
        ({"method": "fspad", "model": "x", "tree": [2], "lookup": {"tokens": 4, "n": 2}}, "tokens required"),
        ({"method": "fspad", "model": "x", "tree": [2], "lookup": {"tokens": True}}, "integers >= 1"),
    ],
)
def test_speculative_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(bad)


def test_speculative_config_selects_decoder_and_reserves_lookahead(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_tokens=1024,
        speculative_config={
            "method": "draft_model",
            "model": str(tiny_model_dir),
            "tree": {"depth": 3, "top_k": 4, "total_tokens": 10},
        },
    )
    engine = llm.engine
    assert engine.decoder_name == "speculative" and engine.config.decoder is None  # the caller's config as given
    assert engine.decoder.lookahead == 10  # the larger of the tree and the draft model's own expanded nodes
    assert engine.max_model_len == 1024 - 10
    with pytest.raises(ValueError, match="needs a speculative_config"):
        LLM(str(tiny_model_dir), kv_cache_tokens=1024, decoder="speculative")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_argmax_is_each_rows_first_maximum(dtype: torch.dtype) -> None:
    """The step's greedy tokens: each row's argmax, the first of tied maxima (logits of few distinct values tie
    often), in fp32 and bf16; None where no row's request is plain greedy."""
    greedy = SimpleNamespace(params=SimpleNamespace(greedy=True, processes_logits=False))
    penalised = SimpleNamespace(params=SimpleNamespace(greedy=True, processes_logits=True))
    gen = torch.Generator().manual_seed(0)
    for logits in [torch.randn(9, 49152, generator=gen), torch.randint(0, 4, (9, 1000), generator=gen).float()]:
        logits = logits.to(dtype)
        got = row_argmax(logits, [greedy, penalised])
        assert got == [int(torch.argmax(row)) for row in logits]
        assert all(logits[i, : got[i]].max() < logits[i, got[i]] for i in range(9) if got[i] > 0)
    assert row_argmax(logits, [penalised]) is None


def test_plain_and_penalised_greedy_requests_verified_in_one_batch(tiny_model_dir):
    """Plain greedy rows take their argmax from one call over the whole step (`row_argmax`); rows whose penalties
    or logits processors change the argmax are processed one by one. Mixed in one batch of trees, each request
    still gets exactly what autoregressive decoding gives it."""
    path = str(tiny_model_dir)
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def odd_only(prompt_ids, output_ids, logits):
        return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 0, float("-inf"))

    penalised = SamplingParams(
        temperature=0,
        max_tokens=24,
        ignore_eos=True,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        repetition_penalty=1.3,
        logit_bias={3: 4.0, 5: -2.0},
        logits_processors=[odd_only],
        logprobs=2,
    )
    prompts, params = [PROMPTS[3], PROMPTS[3], PROMPTS[0], PROMPTS[0]], [plain, penalised, plain, penalised]
    want = LLM(path, kv_cache_tokens=2048).generate(prompts, params, use_tqdm=False)
    llm = LLM(
        path,
        kv_cache_tokens=2048,
        speculative_config={"method": "draft_model", "model": path, "tree": [2, 2, 1], "adaptive": False},
    )
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(t % 2 for t in got[1].outputs[0].token_ids)  # the processor was applied...
    assert any(t % 2 == 0 for t in got[0].outputs[0].token_ids)  # ... to its request only
    for lp, ref in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs):  # the raw model's, both ways
        assert {t: v.rank for t, v in lp.items()} == {t: v.rank for t, v in ref.items()}
        assert [v.logprob for v in lp.values()] == pytest.approx([v.logprob for v in ref.values()], abs=1e-4)
    assert sum(o.metrics.accepted_tokens for o in got) > 0


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_steps_where_adaptive_speculation_decodes_plainly_are_autoregressive_steps(tiny_model_dir, layout):
    """Where the mode selector picks plain decoding, the step samples every request as the autoregressive decoder
    does: seeded sampling with penalties, greedy under a logits processor, logprobs and prompt logprobs come out
    identical, token for token, with no draft and no drafter forward; modes alternating step by step stay lossless
    for greedy requests, the drafter catching up after plain steps."""
    path = str(tiny_model_dir)

    def odd_only(prompt_ids, output_ids, logits):
        return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 0, float("-inf"))

    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, presence_penalty=0.5, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=24, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logits_processors=[odd_only]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]
    prompts = [PROMPTS[3], PROMPTS[5], PROMPTS[0], PROMPTS[1]]
    want = LLM(path, kv_cache_tokens=2048).generate(prompts, params, use_tqdm=False)
    spec = {"method": "draft_model", "model": path, "tree": [2, 2, 1], "layout": layout}
    draft_forwards: list[int] = []
    llm = LLM(path, kv_cache_tokens=2048, speculative_config=spec)
    llm.engine.decoder.drafter.on_forward = draft_forwards.append
    llm.engine.decoder.selector.choose = lambda n, timeable=True: False
    llm.engine.decoder.selector.record = lambda *args: None
    got = llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.metrics.num_drafts == 0
        for lg, lw in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or []):
            assert {t: v.rank for t, v in lg.items()} == {t: v.rank for t, v in lw.items()}
            assert [v.logprob for v in lg.values()] == pytest.approx([v.logprob for v in lw.values()], abs=1e-4)
    assert got[0].outputs[0].logprobs and got[1].prompt_logprobs
    assert [list(p or {}) for p in got[1].prompt_logprobs] == [list(p or {}) for p in want[1].prompt_logprobs]
    assert not draft_forwards
    steps = itertools.count()
    llm.engine.decoder.selector.choose = lambda n, timeable=True: next(steps) % 3 != 0
    greedy = llm.generate(prompts[2:], params[2:], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in want[2:]]
    assert sum(o.metrics.accepted_tokens for o in greedy) > 0 and draft_forwards


# ---- the padded layout: the vanilla baseline's masked KV slots ---------------------------------------------------


def _uneven_self_draft(vocab: int) -> str:
    """A drafter method whose (self-)draft is wrong at a position that differs by sequence and step, so that the
    sequences of one batch accept different lengths."""
    steps = itertools.count(1)

    def uneven(scheduled, budgets, trees):
        step = next(steps)
        for s, tree in zip(scheduled, trees):
            wrong = (step + s.seq.seq_id) % 5
            if wrong < len(tree):
                tree.tokens[wrong] = (tree.tokens[wrong] + 1) % vocab
        return trees

    return tampered_method(uneven)


@pytest.mark.parametrize("kv_cache_tokens", [4096, 320])
def test_padded_layout_advances_every_sequence_by_the_longest_accepted_path(tiny_model_dir, kv_cache_tokens):
    """In `padded`, each verifying sequence's cache grows by the batch's longest accepted path (+ its bonus
    token's slot), its shortfall left as masked slots; `packed` leaves none. Outputs equal autoregressive
    decoding either way, also when the padded slots run the cache out and sequences are preempted (320 tokens)."""
    path = str(tiny_model_dir)
    prompts, params = PROMPTS[:5], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, kv_cache_tokens=4096).generate(prompts, params, use_tqdm=False)]
    vocab = AutoConfig.from_pretrained(path).vocab_size
    for layout in ("packed", "padded"):
        llm = LLM(
            path,
            kv_cache_tokens=kv_cache_tokens,
            speculative_config={
                "method": _uneven_self_draft(vocab),
                "model": path,
                "num_speculative_tokens": 4,
                "adaptive": False,
                "layout": layout,
            },
        )
        engine, holes, outs = llm.engine, 0, {}
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), llm.tokenizer.encode(prompt), params)
        while engine.has_unfinished():  # step by step, looking at the caches between steps
            before = {seq: (seq.num_kv_slots, seq.num_computed) for seq in engine.scheduler.running}
            outs.update((req.request_id, req.output()) for req in engine.step() if req.finished)
            grown = [
                seq.num_kv_slots - slots
                for seq, (slots, computed) in before.items()
                if not seq.finished and computed and seq in engine.scheduler.running
            ]
            if layout == "padded" and not engine.scheduler.num_preemptions:
                assert len(set(grown)) <= 1, grown  # every decoding sequence moved by the same number of slots
            holes = max([holes] + [seq.num_kv_holes for seq in engine.scheduler.running])
        assert [outs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == want, layout
        assert (holes > 0) == (layout == "padded")
        if kv_cache_tokens < 4096 and layout == "padded":
            assert engine.scheduler.num_preemptions > 0


# ---- greedy: identical to autoregressive decoding and transformers ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(tmp_path_factory, smollm2_tokenizer):
    """Greedy autoregressive outputs of SmolLM2 for PROMPTS (max_tokens differ per prompt), checked against
    transformers' generate; and a tiny random draft model with SmolLM2's tokenizer."""
    llm = LLM(SMOLLM2, decoder="autoregressive", kv_cache_tokens=8192, max_model_len=512)
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(llm.model_path, dtype=torch.float32).eval()
    for prompt, p, w in zip(PROMPTS[:3], params, want):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=p.max_tokens,
                do_sample=False,
                pad_token_id=llm.tokenizer.eos_token_id,
            )
        assert out[0, ids.shape[1] :].tolist() == w
    tiny = save_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), smollm2_tokenizer, seed=3)
    return SimpleNamespace(params=params, want=want, path=str(llm.model_path), tiny=str(tiny))


CASES = {  # name -> (speculative_config builder, batch sizes, minimum mean acceptance length)
    "ngram-packed": (lambda r: {"method": "ngram", "num_speculative_tokens": 4}, (1, 8), 1.0),
    "ngram-padded": (lambda r: {"method": "ngram", "num_speculative_tokens": 4, "layout": "padded"}, (8,), 1.0),
    "tiny-draft-chain": (lambda r: {"method": "draft_model", "model": r.tiny, "num_speculative_tokens": 3}, (5,), 1.0),
    "self-draft-chain": (
        lambda r: {"method": "draft_model", "model": r.path, "num_speculative_tokens": 4, "adaptive": False},
        (1, 8),
        4.0,
    ),
    "self-draft-static-tree-padded": (
        lambda r: {"method": "draft_model", "model": r.path, "tree": [2, 2, 1], "layout": "padded", "adaptive": False},
        (3,),
        3.0,
    ),
    "self-draft-dynamic-tree": (
        lambda r: {
            "method": "draft_model",
            "model": r.path,
            "adaptive": False,
            "tree": {"depth": 3, "top_k": 3, "total_tokens": 8},
        },
        (2, 6),
        2.0,
    ),
    "tiny-draft-dynamic-tree": (
        lambda r: {"method": "draft_model", "model": r.tiny, "tree": {"depth": 3, "top_k": 2, "total_tokens": 5}},
        (4,),
        1.0,
    ),
    "tiny-draft-tree-lookup-chain": (
        lambda r: {
            "method": "draft_model",
            "model": r.tiny,
            "adaptive": False,
            "tree": {"depth": 2, "top_k": 2, "total_tokens": 6},
            "lookup": {"tokens": 6, "ngram_min": 1},
        },
        (7,),
        1.3,  # a random draft accepts nothing: the chains do (1.4 measured)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_autoregressive_and_transformers(smollm2_reference, case):
    build, batches, min_accept = CASES[case]
    r = smollm2_reference
    llm = LLM(SMOLLM2, kv_cache_tokens=8192, max_model_len=512, speculative_config=build(r))
    for b in batches:
        outs = llm.generate(PROMPTS[:b], r.params[:b], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == r.want[:b]
        forwards = sum(o.metrics.target_forwards for o in outs)
        accepted = sum(o.metrics.accepted_tokens for o in outs)
        assert (accepted + forwards) / forwards >= min_accept
        for o in outs:
            m = o.metrics
            assert sum(m.accepted_per_position) == m.accepted_tokens <= m.draft_tokens
            assert m.target_forwards + m.accepted_tokens >= len(o.outputs[0].token_ids)  # the last step may overshoot
    assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks


def test_greedy_tiny_with_preemption_chunked_prefill_and_logprobs(tiny_model_dir):
    """Small cache (preemptions), chunked prefill, stop tokens and logprobs, self-draft tree on the tiny model."""
    prompts = PROMPTS[:5]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    ref = LLM(str(tiny_model_dir), kv_cache_tokens=4096, max_model_len=256)
    want = ref.generate(prompts, params, use_tqdm=False)
    spec = {"method": "draft_model", "model": str(tiny_model_dir), "tree": [2, 2, 1], "adaptive": False}
    small = LLM(str(tiny_model_dir), kv_cache_tokens=128, max_model_len=96, speculative_config=spec)
    small.engine.config.scheduler.max_num_batched_tokens = 7
    got = small.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 and lg[t].rank == lw[t].rank for t in lg)
    assert small.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.accepted_tokens for o in got) > 0
    assert small.engine.cache.num_free_blocks == small.engine.cache.num_blocks
    # A stop token inside an accepted run ends the request right there.
    stop = want[2].outputs[0].token_ids[7]
    cut = small.generate(
        prompts[2], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert cut.token_ids == want[2].outputs[0].token_ids[: want[2].outputs[0].token_ids.index(stop) + 1]


# ---- sampling: the target's distribution, exactly -----------------------------------------------------------------

VOCAB = 24
DRAWS = 6000


def _tiny_vocab_model(path: Path, seed: int, base: Path | None = None) -> Path:
    """A random Llama over a 24-token word-level vocabulary, saved with its tokenizer; with `base`, that model's
    weights plus noise (a related but mismatched drafter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        if base is not None:
            weights = LlamaForCausalLM.from_pretrained(base).state_dict()
            for name, p in model.named_parameters():
                p.copy_(weights[name] + (0.1 * p if p.dim() == 2 else 0))
    model.save_pretrained(path)
    return path


def _joint_first_two(
    model_dir: Path, prompt: list[int], params: SamplingParams, masks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Exact P(first token, second token) `[V, V]` under the request's temperature / top-k / top-p, with `masks`
    (`[V]` each, 0 or -inf: what a grammar allows at the first and at the second position) added to the logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stub = SimpleNamespace(params=params)
    add1, add2 = (0.0, 0.0) if masks is None else (masks[0].double(), masks[1].double())
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([prompt])).logits[0, -1].double() + add1, stub)
        both = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2 = torch.stack([target_probs(row.double() + add2, stub) for row in model(both).logits[:, -1]])
    return p1[:, None] * p2


def _tv_tolerance(p: torch.Tensor, n: int, quantile: float = 0.999) -> float:
    """The `quantile` of the total-variation distance between p and the empirical law of n draws from p."""
    g = torch.Generator().manual_seed(0)
    counts = torch.stack(
        [
            torch.bincount(torch.multinomial(p.flatten(), n, replacement=True, generator=g), minlength=p.numel())
            for _ in range(400)
        ]
    )
    tv = 0.5 * (counts.double() / n - p.flatten()).abs().sum(-1)
    return float(torch.quantile(tv, quantile))


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vocab")
    target = _tiny_vocab_model(root / "target", seed=0)
    return SimpleNamespace(target=target, draft=_tiny_vocab_model(root / "draft", seed=1, base=target))


@pytest.fixture
def one_thread():
    """Many tiny per-sequence attention calls: threads cost more than they give on a small CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name, spec, params",
    [
        (
            "draft-chain",
            {"method": "draft_model", "num_speculative_tokens": 2},
            SamplingParams(temperature=1.0, max_tokens=3),
        ),
        (
            "draft-tree",
            {"method": "draft_model", "tree": [3, 2]},
            SamplingParams(temperature=0.8, top_p=0.9, max_tokens=3),
        ),
        (
            "ngram-chain",
            {"method": "ngram", "num_speculative_tokens": 2},
            SamplingParams(temperature=1.0, top_k=12, max_tokens=3),
        ),
        (
            "draft-tree-lookup-chain",
            {"method": "draft_model", "tree": [2, 2], "lookup": {"tokens": 2}},  # top-k children: q one-hot
            SamplingParams(temperature=1.0, max_tokens=3),
        ),
    ],
)
def test_sampling_matches_target_distribution(tiny_vocab, one_thread, name, spec, params):
    prompt = [3, 5, 7, 3, 5, 7, 3]  # n-gram lookup proposes 5, 7
    exact = _joint_first_two(tiny_vocab.target, prompt, params)
    draft = _joint_first_two(tiny_vocab.draft, prompt, params)
    llm = LLM(
        str(tiny_vocab.target),
        kv_cache_tokens=DRAWS * 32,
        max_num_seqs=512,
        max_model_len=64,
        speculative_config={**spec, "model": str(tiny_vocab.draft), "adaptive": False}
        if spec["method"] == "draft_model"
        else {**spec, "adaptive": False},
    )
    seeded = [SamplingParams(**{**params.__dict__, "seed": i, "ignore_eos": True}) for i in range(DRAWS)]
    outs = llm.generate([prompt] * DRAWS, seeded, use_tqdm=False)
    firsts = torch.tensor([o.outputs[0].token_ids[:2] for o in outs])
    counts = torch.bincount(firsts[:, 0] * VOCAB + firsts[:, 1], minlength=VOCAB * VOCAB).double()
    tv = 0.5 * float((counts / DRAWS - exact.flatten()).abs().sum())
    tolerance = _tv_tolerance(exact, DRAWS)
    assert tv < tolerance, f"{name}: TV {tv:.4f} >= {tolerance:.4f}"
    # The test has power: the drafter's own law is far outside the tolerance, and drafts were accepted.
    if spec["method"] == "draft_model":
        assert 0.5 * float((draft - exact).abs().sum()) > 1.5 * tolerance
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    assert accepted > DRAWS // 50


# ---- through the HTTP server ---------------------------------------------------------------------------------------


def test_server_streams_several_tokens_per_step_and_counts_spec_metrics(tiny_model_dir, tmp_path):
    spec = {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 4, "adaptive": False}
    with running_server(
        tiny_model_dir, tmp_path / "server.log", "--kv-cache-tokens", "4096", "--speculative-config", json.dumps(spec)
    ) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        before = scrape(url)
        stream = client.completions.create(
            model=MODEL,
            prompt="The quick brown fox",
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [c for c in stream if c.choices and c.choices[0].text]
        plain = client.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        after = scrape(url)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert len(chunks) <= 20 // 5 + 1  # the model drafts for itself: 5 tokens per step

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    drafts = delta("leapserve:spec_decode_num_drafts_total")
    assert 2 * 3 <= drafts <= 2 * 5
    assert delta("leapserve:spec_decode_num_draft_tokens_total") == 4 * drafts
    accepted = delta("leapserve:spec_decode_num_accepted_tokens_total")
    assert accepted >= 2 * 15
    per_pos = [delta("leapserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(4)]
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[3] > 0
