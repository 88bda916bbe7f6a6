"""Trees sized by cost: the sizer's rule on synthetic costs and acceptance, the drafters' best-first node order it
rests on, and the real engine sizing its trees on a modeled accelerator."""

from __future__ import annotations

import random

import pytest
from transformers import AutoConfig

from drafter_plugins import tampered_method
from leapserve.benchmarks.roofline import Roofline, VirtualClock
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.decoders.tree_budget import Thresholds, TreeSizer, VerifyCost


def test_verify_cost_interpolates_extrapolates_and_never_decreases():
    cost = VerifyCost({1: 0.010, 2: 0.009, 4: 0.012, 8: 0.020})
    assert cost.seconds == [0.010, 0.010, 0.012, 0.020]  # 2 tokens timed faster than 1: noise
    assert cost(3) == pytest.approx(0.011)
    assert cost(6) == pytest.approx(0.016)
    assert cost(16) == pytest.approx(0.036)  # beyond the last point: the last two points' slope
    timed = []
    slow_first = {1: 0.030}  # the first forward after compiling reads slow
    cost = VerifyCost.measure(lambda tokens: timed.append(tokens) or slow_first.pop(tokens, 0.001 * tokens), 96)
    assert timed == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 96] * 3  # in turn, three rounds
    assert cost(1) == pytest.approx(0.001) and cost(96) == pytest.approx(0.096)
    with pytest.raises(ValueError):
        VerifyCost({})


def measured(
    sizer: TreeSizer, acceptance: list[float], level_seconds: float, rest: float = 0.0, sizes=(1, 2, 4, 8, 16, 32)
) -> None:
    """Feed `sizer` 200 trees whose r-th node is accepted in a share acceptance[r - 1] of them, and at every batch
    size a drafting step of three levels taking `level_seconds` each, verification as the sizer's cost says, and
    `rest` seconds of everything else."""
    for i in range(200):
        sizer.record_tree(len(acceptance), [r for r, p in enumerate(acceptance, start=1) if i % 100 < 100 * p])
    for n in sizes:
        step = 3 * level_seconds + sizer.verify_cost(4 * n) + rest
        sizer.record_step(n, 3 * level_seconds, 3, step, 4 * n)


def test_sizer_weighs_what_a_node_buys_against_what_a_step_costs():
    """Worked by hand: p = (1, 0.5, 0.1), no drafting cost, verifying T tokens takes T ms. With nothing else in a
    step, a tree of one node commits 2 tokens in 2 ms (1 per ms), of two 2.5 in 3 ms (0.83): one node. With 10 ms
    of the rest of a step (sampling, bookkeeping), 2 / 12 = 0.167, 2.5 / 13 = 0.192, 2.6 / 14 = 0.186: two."""
    linear = VerifyCost({1: 0.001, 64: 0.064})
    bare = TreeSizer(linear, max_nodes=3, depth=3)
    measured(bare, [1.0, 0.5, 0.1], 0.0)
    assert bare.best_budget(1, 3) == 1
    assert bare.predicted_rate(1, 3) == pytest.approx(1000.0)  # tokens per sequence per second
    busy = TreeSizer(linear, max_nodes=3, depth=3)
    assert busy.predicted_rate(1, 3) is None  # nothing measured yet
    measured(busy, [1.0, 0.5, 0.1], 0.0, rest=0.010)
    assert busy.best_budget(1, 3) == 2
    p = busy.acceptance()  # about (1, 0.5, 0.1): decayed counts weigh the last trees more
    assert busy.predicted_rate(1, 3) == pytest.approx((1 + p[0] + p[1]) / 0.013)
    assert busy.best_budget(1, 1) == 1  # never above the cap
    assert busy.predicted_rate(1, 1) == pytest.approx((1 + p[0]) / 0.012)
    assert busy.predicted_rate(64, 3) is None  # no drafting step timed in this bucket
    # ... but bucket 32's costs (3 levels, 10 ms of the rest) bound it: verifying 64 x (1 + n) tokens costs more
    assert busy.predicted_rate(64, 3, from_smaller=True) == pytest.approx(
        max((1 + sum(p[:n])) / (0.010 + 0.064 * (1 + n)) for n in (1, 2, 3))
    )
    assert busy.predicted_rate(33, 3, from_smaller=True) < busy.predicted_rate(32, 3)


ACCEPTANCE = [0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.03]  # a drafter's p_r, best first


def test_sizer_shrinks_trees_as_the_batch_grows_only_where_verification_costs():
    """An AVX2 CPU (every token costs 2 ms beyond a 20 ms forward) sizes trees down as requests are added; a GPU
    (flat up to 256 tokens) keeps the whole tree at every batch size up to 16."""
    cpu = TreeSizer(VerifyCost({t: 0.020 + 0.002 * t for t in (1, 64, 128)}), max_nodes=8, depth=4)
    measured(cpu, ACCEPTANCE, 0.0015)
    budgets = [cpu.best_budget(n, 8) for n in (1, 4, 16)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] >= 1
    gpu = TreeSizer(VerifyCost({t: 0.010 * max(1, t / 256) for t in (1, 256, 512)}), max_nodes=8, depth=4)
    measured(gpu, ACCEPTANCE, 0.0005)
    assert [gpu.best_budget(n, 8) for n in (1, 4, 16)] == [8, 8, 8]


def test_sizer_separates_a_proposals_fixed_cost_from_its_cost_per_level():
    """A drafter costing 20 ms a proposal plus 1 ms a level, verification flat at 10 ms. Seen at one level only,
    the 21 ms look like a cost per level, and one node wins; once proposals of four levels (24 ms) are seen too,
    the fixed part is known and the whole tree of 8 wins."""
    sizer = TreeSizer(VerifyCost({1: 0.010, 512: 0.010}), max_nodes=8, depth=4)
    measured(sizer, ACCEPTANCE, 0.0, sizes=())
    for _ in range(4):
        sizer.record_step(1, 0.021, 1, 0.031, 2)
    assert sizer.best_budget(1, 8) == 1
    for _ in range(4):
        sizer.record_step(1, 0.024, 4, 0.034, 9)
    assert sizer.best_budget(1, 8) == 8


@pytest.mark.parametrize("plain_steps_seen", [True, False])
def test_a_machine_slowing_down_after_start_up_does_not_grow_the_trees(plain_steps_seen):
    """Verification timed at start-up (20 ms + 2 ms a token), then the whole machine runs 1.5x slower: drafting,
    verification and the rest alike, so the tree that paid still pays best. Told by the plain steps, the sizer
    prices verification 1.5x and keeps its budget; without them the slower verification would count as fixed rest,
    beside which further nodes look cheap, and the trees would grow from 3 to 5 nodes."""
    cost = VerifyCost({t: 0.020 + 0.002 * t for t in (1, 64)})
    sizer = TreeSizer(cost, max_nodes=8, depth=4)
    measured(sizer, ACCEPTANCE, 0.0, sizes=())
    level, rest = 0.0015, 0.002

    def run(speed: float, plain: bool) -> None:  # a window of plain steps and one of drafting steps (budget 3)
        for _ in range(Thresholds().draft_window):
            if plain:
                sizer.record_plain(1, speed * (cost(1) + rest))
            sizer.record_step(1, speed * 3 * level, 3, speed * (3 * level + cost(4) + rest), 4)

    run(1.0, plain=True)
    assert sizer.drift(1) == pytest.approx(1.0) and sizer.best_budget(1, 8) == 3
    run(1.5, plain=plain_steps_seen)
    if plain_steps_seen:
        assert sizer.drift(1) == pytest.approx(1.5) and sizer.best_budget(1, 8) == 3
        run(0.9, plain=True)  # faster than its first plain steps: V is still priced as timed
        assert sizer.drift(1) == 1.0 and sizer.best_budget(1, 8) == 3
    else:
        assert sizer.drift(1) == pytest.approx(1.0) and sizer.best_budget(1, 8) == 5


def test_sizer_drafts_the_cap_until_measured_then_explores_one_rank_beyond_in_turn():
    sizer = TreeSizer(VerifyCost({t: 0.020 + 0.002 * t for t in (1, 64)}), max_nodes=8, depth=4)
    assert sizer.budgets(3, 8) == [8, 8, 8]  # nothing measured yet
    sizer.record_tree(4, [1, 2])
    assert sizer.acceptance()[4:] == [None] * 4  # ranks beyond a tree's budget learn nothing from it
    measured(sizer, ACCEPTANCE, 0.0015, sizes=(4,))
    best = sizer.best_budget(3, 8)
    assert best < 8
    # one more node and level cost ~10% of a step here (2 ms a token beyond 20 ms, 1.5 ms a level): explorations
    # are spaced to cost 2% of drafting's time, not every `explore_every` steps
    gap = sizer._explore_gap(3, best)
    assert gap > Thresholds().explore_every
    rounds = [sizer.budgets(3, 8) for _ in range(3 * gap)]
    explored = [i for i, b in enumerate(rounds) if b != [best] * 3]
    assert explored == [gap - 1, 2 * gap - 1, 3 * gap - 1]
    assert all(sorted(rounds[i]) == [best, best, best + 1] for i in explored)
    assert len({rounds[i].index(best + 1) for i in explored}) == len(explored)  # a different sequence each time


def test_a_batch_sizes_first_trees_are_sized_at_a_smaller_batchs_costs():
    """Acceptance measured and drafting timed at one request only (1.5 ms a level, verification 20 ms + 2 ms a
    token). At 16 requests, not yet timed, bucket 1's costs stand in: one node commits 1.7 tokens a sequence in
    1.5 + 84 ms (19.9 a second), two 2.2 in 3 + 116 ms (18.5): one node, not the cap's 8 (16 x 9 tokens verified).
    A batch size with only larger ones timed still drafts the cap."""
    sizer = TreeSizer(VerifyCost({t: 0.020 + 0.002 * t for t in (1, 64, 128)}), max_nodes=8, depth=4)
    measured(sizer, ACCEPTANCE, 0.0015, sizes=(1,))
    assert sizer.predicted_rate(16, 8) is None  # no drafting step timed at 16 ...
    assert sizer.budgets(16, 8) == [1] * 16 and not sizer.measuring  # ... but sized, and timed as sized
    larger_only = TreeSizer(VerifyCost({t: 0.020 + 0.002 * t for t in (1, 64, 128)}), max_nodes=8, depth=4)
    measured(larger_only, ACCEPTANCE, 0.0015, sizes=(16,))
    assert larger_only.budgets(4, 8) == [8] * 4 and larger_only.measuring


def test_sizer_climbs_to_a_larger_budget_through_its_explored_rank():
    """The drafter of the fixed-cost test (20 ms a proposal plus 1 ms a level, verification flat at 10 ms), seen
    at one level only: one node wins. Exploring one rank beyond shows two-level proposals, the fixed part becomes
    known and the budget grows to the whole tree, without any step drafting more than one node beyond the budget
    of the step before."""
    sizer = TreeSizer(VerifyCost({1: 0.010, 512: 0.010}), max_nodes=8, depth=4)
    measured(sizer, ACCEPTANCE, 0.0, sizes=())
    for _ in range(4):
        sizer.record_step(1, 0.021, 1, 0.031, 2)
    budgets = [sizer.best_budget(1, 8)]
    for i in range(64):
        (b,) = sizer.budgets(1, 8)
        assert b <= budgets[-1] + 1
        levels = min(b, 4)
        sizer.record_tree(b, [r for r, p in enumerate(ACCEPTANCE[:b], start=1) if i % 100 < 100 * p])
        sizer.record_step(1, 0.020 + 0.001 * levels, levels, 0.030 + 0.001 * levels, 1 + b)
        budgets.append(sizer.best_budget(1, 8))
    assert budgets[0] == 1 and budgets[-1] == 8


def _first_trees(path: str, tree: dict) -> list:
    """The first proposal the draft model makes on one prompt (a tree of the given shape, drafting every step)."""
    seen = []

    def keep(scheduled, budgets, trees):
        seen.append([(t.tokens, t.parents) for t in trees])
        return trees

    spec = {"method": tampered_method(keep), "model": path, "tree": tree, "adaptive": False}
    llm = LLM(path, kv_cache_tokens=1024, speculative_config=spec)
    llm.generate([[100, 200, 300, 400]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return next(trees for trees in seen if any(tokens for tokens, _ in trees))


def test_a_drafters_tree_lists_its_best_nodes_first(tiny_model_dir):
    """The nodes a budget of 5 keeps are the first 5 of the 12-node tree grown from the same state, with the same
    parents: so a budget is a prefix, and the sizer's r-th node is the one a budget of r adds."""
    path = str(tiny_model_dir)
    [(tokens, parents)] = _first_trees(path, {"depth": 4, "top_k": 3, "total_tokens": 12})
    [(small_tokens, small_parents)] = _first_trees(path, {"depth": 4, "top_k": 3, "total_tokens": 5})
    assert len(tokens) == 12 and (small_tokens, small_parents) == (tokens[:5], parents[:5])
    assert all(p < i for i, p in enumerate(parents, start=1))
    assert parents != sorted(parents)  # not level by level: best first reaches down before it fills a level


@pytest.mark.parametrize("running, knee", [(1, 64), (16, 32)])
def test_trees_are_sized_by_the_modeled_cost(tiny_model_dir, running, knee):
    """On a modeled accelerator (a target forward costs max(10 ms, 10 ms x T / knee)) with each draft token kept
    with probability 0.6, the engine drafts up to 4-token chains. At one request verification is flat, so deep
    chains pay; at 16 it costs 5 ms a token per request, so a chain of one does. Outputs stay plain
    decoding's."""
    path = str(tiny_model_dir)
    vocab, keep = AutoConfig.from_pretrained(path).vocab_size, random.Random(1)
    budgets = []

    def corrupted(scheduled, step_budgets, trees):
        budgets.extend(b for b in step_budgets if b)
        for tree in trees:
            wrong = next((i for i in range(len(tree)) if keep.random() >= 0.6), None)
            if wrong is not None:
                tree.tokens[wrong] = (tree.tokens[wrong] + 1) % vocab
        return trees

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(8, 64))] for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    roofline = Roofline(forward_ms=10, knee_tokens=knee)
    outputs = {}
    for name, spec in [
        ("plain", None),
        ("sized", {"method": tampered_method(corrupted), "model": path, "num_speculative_tokens": 4}),
    ]:
        clock = VirtualClock.of(roofline)
        llm = LLM(
            path,
            kv_cache_tokens=16 * 640,
            max_num_seqs=running,
            speculative_config=spec,
            clock=clock,
            observers=[clock],
        )
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if spec is not None and running > 1:  # plain steps were timed: the modeled machine does not drift
            sizer = llm.engine.decoder.sizer
            assert sizer.plain_last and sizer.drift(running) == pytest.approx(1.0, abs=0.05)
    assert outputs["sized"] == outputs["plain"]
    late = budgets[len(budgets) // 2 :]
    mean = sum(late) / len(late)
    if running == 1:
        assert mean >= 2.5
    else:
        assert mean <= 1.5


def test_a_kv_cache_smaller_than_a_step_still_starts(tiny_model_dir):
    """Start-up times verification only up to what the KV cache holds (32 tokens here, below the 96 a step of 32
    requests could verify), and the engine serves."""
    llm = LLM(
        str(tiny_model_dir), kv_cache_tokens=32, speculative_config={"method": "ngram", "num_speculative_tokens": 4}
    )
    assert llm.engine.decoder.sizer.verify_cost.tokens[-1] == 32
    out = llm.generate(
        [[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 8
