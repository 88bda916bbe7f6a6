"""Adaptive speculation: the mode selector's rule on synthetic step times, and the real engine and drafter
drafting only where it pays, on a virtual clock (injected through the engine's observation seam)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from transformers import AutoConfig

from drafter_plugins import tampered_method
from leapserve.benchmarks.engine_pass import StepLog
from leapserve.benchmarks.roofline import Roofline, VirtualClock
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.decoders.adaptive import ModeSelector
from leapserve.decoding.drafter import DraftTree
from test_speculative import PROMPTS

# ---- adaptive speculation: drafting only where it pays ---------------------------------------------------------


def run(
    selector: ModeSelector, n: int, steps: int, rate: dict[bool, float], timeable: bool = True
) -> list[tuple[str, int]]:
    """The modes `selector` chooses over `steps` steps of n sequences, as (mode, run length) pairs; `rate`: tokens
    per sequence per second of each mode (drafting? -> rate)."""
    modes = ""
    for _ in range(steps):
        drafts = selector.choose(n, timeable)
        selector.record(n, drafts, 10 * n, 10 / rate[drafts], timeable)
        modes += "D" if drafts else "p"
    return runs(modes)


def runs(modes: str) -> list[tuple[str, int]]:
    return [(mode, len(list(run))) for mode, run in itertools.groupby(modes)]


SLOW_DRAFTS = {True: 50.0, False: 100.0}  # drafting steps take 2x as long and commit at half the rate


def test_mode_selector_runs_the_faster_mode_and_probes_the_other():
    selector = ModeSelector()
    # Steps with prompt tokens are not timed; drafting's warm-up waits for one that is, plain decoding meanwhile.
    assert run(selector, 1, 3, SLOW_DRAFTS, timeable=False) == [("p", 3)]
    # One sequence: three timed steps of each mode (not the first after a switch), then the faster one.
    assert run(selector, 1, 8, SLOW_DRAFTS) == [("p", 3), ("D", 4), ("p", 1)]
    # Probes of 1 + 3 steps re-time drafting. Drafting's last 4 timed-or-first steps took 0.8 s for 40 tokens that
    # plain decoding commits in 0.4 s: a probe loses 4 plain steps, so keeping probes under 1% of throughput
    # puts them 400 steps apart.
    assert run(selector, 1, 600, SLOW_DRAFTS) == [("p", 395), ("D", 4), ("p", 201)]
    # Drafting becomes 3x faster: the next probe measures it afresh (not averaged with the old runs), goes on
    # until it has 3 x 3 timed steps (a switch to drafting needs them) and drafting takes over. A probe of plain
    # decoding would now lose 8 drafting steps (4 plain steps commit what 1.33 drafting steps do): 800 apart.
    assert run(selector, 1, 600, {True: 300.0, False: 100.0}) == [("p", 195), ("D", 405)]
    # Every batch-size bucket (a power of two) learns on its own. With 3 sequences (bucket 4) a step's committed
    # tokens vary less: two timed steps of each mode decide, and a probe is 3 steps. The warm-up's two drafting
    # steps lost two plain steps (gap 200), a 3-step probe loses 3 (gap 300, beyond this run).
    assert run(selector, 3, 400, SLOW_DRAFTS) == [("D", 2), ("p", 200), ("D", 3), ("p", 195)]
    # A new bucket starts from its neighbours: bucket 16 lies above bucket 4, which decodes plainly, so it starts
    # plainly, leaves drafting to the probes and spaces them by bucket 4's probe cost until it has its own. There
    # drafting costs 10x: once measured, probes move 2,048 steps apart, the limit.
    assert run(selector, 16, 200, {True: 10.0, False: 100.0}) == [("p", 200)]
    assert run(selector, 16, 300, {True: 10.0, False: 100.0}) == [("p", 100), ("D", 3), ("p", 197)]
    assert selector._probe_gap(16, False) == 2048
    assert set(selector.buckets) == {1, 4, 16}


def test_mode_selector_below_a_drafting_bucket_drafts_at_once():
    """Below a bucket that drafts, a new bucket drafts without warming plain decoding up. (Bucket 8 switches to
    drafting once it has 3 x 2 fresh timed steps of it: the warm-up's are forgotten when plain decoding runs.)"""
    selector = ModeSelector()
    assert run(selector, 8, 14, {True: 300.0, False: 100.0}) == [("D", 3), ("p", 3), ("D", 8)]
    assert selector.buckets[8].best is True
    assert run(selector, 3, 30, {True: 300.0, False: 100.0}) == [("D", 30)]


def test_mode_selector_backs_off_near_parity():
    """Near parity (drafting 1.03x, below the 1.05x margin) a probe costs nothing: the back-off alone spaces them,
    16 steps at first and twice as far after each probe that changes nothing, up to 256."""
    assert run(ModeSelector(), 2, 700, {True: 103.0, False: 100.0}) == [
        ("D", 3),
        ("p", 16),
        ("D", 3),
        ("p", 29),
        ("D", 3),
        ("p", 61),
        ("D", 3),
        ("p", 125),
        ("D", 3),
        ("p", 253),
        ("D", 3),
        ("p", 198),
    ]


def test_mode_selector_compares_modes_per_sequence():
    """The batch size varies within a bucket (9 to 16 sequences here): modes are compared by tokens per sequence,
    so plain steps of 10 sequences are not judged against drafting steps of 16. Per step, drafting commits 2.2
    tokens per sequence in 224 ms; plain decoding one in 60 ms + 1.5 ms per sequence (84 ms for 16, 75 ms for
    10: per step, drafting 16 sequences commits 157 tokens/s, plain decoding 10 sequences 133)."""
    selector, modes = ModeSelector(), ""
    for i in range(400):
        n = 16 if i < 20 else 10
        drafts = selector.choose(n)
        selector.record(n, drafts, 2.2 * n if drafts else n, 0.224 if drafts else 0.060 + 0.0015 * n, True)
        modes += "D" if drafts else "p"
    assert runs(modes) == [("D", 3), ("p", 237), ("D", 3), ("p", 157)]


def test_mode_selector_does_not_time_prompt_steps():
    """Steps with prompt tokens ("_" plain, "d" drafting) are not timed: here every other step carries a prompt.
    Within a warm-up or probe of drafting they decode plainly, neither ending nor joining it (the warm-up's three
    drafting steps are those without); where drafting is the choice, they draft too."""

    def alternating(drafting_seconds: float, steps: int) -> str:
        selector, modes = ModeSelector(), ""
        for i in range(steps):
            timeable = i % 2 == 1
            drafts = selector.choose(16, timeable)
            selector.record(16, drafts, 2.2 * 16 if drafts else 16, drafting_seconds if drafts else 0.08, timeable)
            modes += ("D" if drafts else "p") if timeable else ("d" if drafts else "_")
        return modes

    assert alternating(0.3, 400) == "_p_p_D_D_D" + "_p" * 195  # drafting loses
    assert alternating(0.05, 60) == "_p_p_D_D_D_D_D_D_D" + "dD" * 21  # drafting wins, after 3 x 2 timed steps


def test_mode_selector_is_not_fooled_by_slow_steps():
    """Near parity (drafting 0.97x per sequence) with noise: every tenth and eleventh step takes 1.5x as long,
    whatever its mode. A step-time mean would hold those slow steps against the mode that ran longest, and a
    probe of two timed steps would usually look 10% faster than it is: drafting would take over and lose. The
    median of the last steps does not: drafting runs on probes only (an untimed step and two timed ones)."""
    selector, modes = ModeSelector(), ""
    for i in range(1000):
        drafts = selector.choose(16)
        slow = 1.5 if i % 10 in (0, 9) else 1.0
        selector.record(16, drafts, 2.2 * 16 if drafts else 16, slow * (0.140 if drafts else 0.062), True)
        modes += "D" if drafts else "p"
    drafting_runs = [len(run) for run in modes.split("p") if run]
    assert len(drafting_runs) >= 5 and set(drafting_runs) == {3}


def test_mode_selector_switches_to_drafting_only_on_enough_steps():
    """Drafting costs 2x a plain step and commits 3 tokens per sequence on the first two timed steps of a run, one
    after: 1.5x plain decoding's rate on a probe's two timed steps, half of it from then on. A probe that finds drafting
    faster goes on until it has 3 x 2 timed steps or no longer finds it faster, so lucky probes do not switch the
    bucket, and the back-off spaces them further each time."""
    selector, modes, run_length = ModeSelector(), "", 0
    for _ in range(300):
        drafts = selector.choose(4)
        run_length = run_length + 1 if drafts else 0
        tokens = 3.0 if drafts and run_length in (2, 3) else 1.0
        selector.record(4, drafts, 4 * tokens, 0.2 if drafts else 0.1, True)
        modes += "D" if drafts else "p"
    assert runs(modes) == [
        ("D", 3),
        ("p", 3),
        ("D", 5),
        ("p", 13),
        ("D", 5),
        ("p", 29),
        ("D", 5),
        ("p", 61),
        ("D", 5),
        ("p", 125),
        ("D", 5),
        ("p", 41),
    ]
    assert selector.buckets[4].best is False


def test_mode_selector_skips_probes_the_cost_model_finds_useless():
    """Drafting runs at 0.9x plain decoding. Where the tree sizer's model also expects it below the margin (here
    0.95x), a probe could not switch the bucket: none runs, except one every `probe_cost_max` steps so that a stale
    model is corrected. Without a model, probes back off from 16 steps to 256. Once acceptance rises and the model
    expects 1.2x, probes are run again at the back-off's spacing."""
    slower = {True: 90.0, False: 100.0}
    assert [m for m, _ in run(ModeSelector(), 16, 3000, slower)].count("D") > 10
    expected = [95.0]
    selector = ModeSelector(predict=lambda n: expected[0])
    assert run(selector, 16, 3000, slower) == [("D", 3), ("p", 2051), ("D", 3), ("p", 943)]
    expected[0] = 120.0
    assert run(selector, 16, 600, slower) == [
        ("D", 3),
        ("p", 61),
        ("D", 3),
        ("p", 125),
        ("D", 3),
        ("p", 253),
        ("D", 3),
        ("p", 149),
    ]


def test_mode_selector_hurries_probes_the_cost_model_expects_to_switch():
    """One request meets a prompt its drafter guesses badly: drafting runs at half plain decoding's rate, so a probe
    loses 4 plain steps and, spaced for cost, would come 400 steps later. The tree sizer's model, whose acceptance
    follows all the traffic, still expects drafting 1.5x faster: probes come at the back-off's spacing instead, and
    drafting takes over at the first one after the next prompt drafts well again."""
    selector = ModeSelector(predict=lambda n: 150.0)
    assert run(selector, 1, 8, SLOW_DRAFTS) == [("D", 4), ("p", 4)]
    assert run(selector, 1, 100, SLOW_DRAFTS) == [("p", 12), ("D", 4), ("p", 28), ("D", 4), ("p", 52)]
    assert run(selector, 1, 100, {True: 300.0, False: 100.0}) == [("p", 8), ("D", 92)]
    without_model = ModeSelector()
    assert run(without_model, 1, 108, SLOW_DRAFTS) == [("D", 4), ("p", 104)]
    assert without_model._probe_gap(1, False) == 400
    assert run(without_model, 1, 100, {True: 300.0, False: 100.0}) == [("p", 100)]


def test_mode_selector_does_not_switch_on_an_old_drafting_rate():
    """16 sequences whose steps slow down as their contexts grow: plain decoding from 100 to 80 tokens per sequence
    per second over 400 steps, drafting at 0.97x it throughout, as the tree sizer's model expects. The rate
    drafting had in the warm-up soon reads 5% above plain decoding's current one; it starts no drafting: the model
    sides with plain decoding, and a probe it finds useless is skipped (up to `probe_cost_max` steps)."""
    plain = [100.0]
    selector = ModeSelector(predict=lambda n: 0.97 * plain[0])
    modes = ""
    for i in range(400):
        plain[0] = 100.0 - 20.0 * i / 400
        drafts = selector.choose(16)
        selector.record(16, drafts, 10 * 16, 10 / (0.97 * plain[0] if drafts else plain[0]), True)
        modes += "D" if drafts else "p"
    assert runs(modes) == [("D", 3), ("p", 397)]
    assert selector.buckets[16].rate(True) > 1.05 * selector.buckets[16].rate(False)  # the old rate reads faster


def test_mode_selector_skips_a_warm_up_the_bound_finds_useless():
    """Bucket 4 drafts (3x plain decoding's rate). At 16 sequences, not yet drafted at, `bound` gives the rate
    drafting would reach at bucket 4's costs: plain decoding warms up first, and where even that bound is under
    `draft_margin` times its rate (here 0.9x), drafting is never warmed up nor probed (up to `probe_cost_max`
    steps); where it is above (1.2x), drafting warms up after it (its first step untimed: the drafter catches up)
    and the measurement decides. Without a bound drafting warms up first, as the last step drafted."""
    cases = [(90.0, [("p", 300)]), (120.0, [("p", 3), ("D", 3), ("p", 294)]), (None, [("D", 2), ("p", 298)])]
    for bound, want in cases:
        selector = ModeSelector(
            predict=lambda n: 10.0 if n > 4 else None, bound=lambda n, b=bound: b if n > 4 else None
        )
        assert run(selector, 4, 20, {True: 300.0, False: 100.0})[-1] == ("D", 14)
        assert run(selector, 16, 300, {True: 50.0, False: 100.0}) == want
        assert selector.buckets[16].best is False


@pytest.mark.parametrize("accepted", [False, True])
def test_adaptive_drafts_only_where_drafting_pays(tiny_model_dir, accepted):
    """A self-drafting target accepts everything; shifting every drafted token by one makes it accept nothing.
    On a virtual clock where a target forward costs 10 ms + 1 ms per token, drafting then pays (5 tokens per
    step) or not (one token per step for more work): after warm-up the decoder drafts on most steps in the first
    case and only on the selector's probes in the second. Outputs stay those of autoregressive decoding."""
    path = str(tiny_model_dir)
    prompts, params = PROMPTS[:4], SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, kv_cache_tokens=4096).generate(prompts, params, use_tqdm=False)]
    vocab = AutoConfig.from_pretrained(path).vocab_size

    def shifted(scheduled, budgets, trees):
        return trees if accepted else [DraftTree.chain([(t + 1) % vocab for t in tree.tokens]) for tree in trees]

    clock, steps = VirtualClock(lambda tokens: 0.010 + 0.001 * tokens, lambda tokens: 0.001), StepLog()
    llm = LLM(
        path,
        kv_cache_tokens=4096,
        clock=clock,
        observers=[clock, steps],
        speculative_config={"method": tampered_method(shifted), "model": path, "num_speculative_tokens": 4},
    )
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    late = [r.drafted for r in steps.records[8:]]
    if accepted:
        assert sum(late) >= 0.8 * len(late) and len(late) >= 16
    else:
        assert sum(late) <= 0.2 * len(late) and len(late) >= 100
        assert sum(o.metrics.accepted_tokens for o in outs) == 0


def _on_roofline(
    path: str, running: int, knee: int, accept: float, speculative_config: dict | None = None, slow_every: int = 0
) -> tuple[float, list[list[int]]]:
    """64 requests (prompts of 32-256 random tokens, 48 tokens each) under continuous batching with at most
    `running` at once, on a modeled accelerator: a target forward of T tokens costs max(10 ms, 10 ms x T / knee)
    (flat while the weights' stream dominates, then linear), a draft forward a tenth of that, and with
    `slow_every` every such forward 1.5x (a neighbour on the device). Each drafted token is kept with probability
    `accept`, up to the first one corrupted. Returns the virtual seconds and the outputs."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(32, 256))] for _ in range(64)]
    roofline = Roofline(forward_ms=10, knee_tokens=knee)

    def slowed(share: float) -> Callable[[int], float]:
        forwards = itertools.count()
        return lambda tokens: (
            share * roofline.seconds(tokens) * (1.5 if slow_every and next(forwards) % slow_every == 0 else 1.0)
        )

    clock = VirtualClock(slowed(1.0), slowed(0.1))
    if speculative_config:
        vocab, keep = AutoConfig.from_pretrained(path).vocab_size, random.Random(1)

        def corrupted(scheduled, budgets, trees):
            for tree in trees:
                wrong = next((i for i in range(len(tree)) if keep.random() >= accept), None)
                if wrong is not None:
                    tree.tokens[wrong] = (tree.tokens[wrong] + 1) % vocab
            return trees

        speculative_config = {**speculative_config, "method": tampered_method(corrupted)}
    llm = LLM(
        path,
        kv_cache_tokens=running * 640,
        max_num_seqs=running,
        speculative_config=speculative_config,
        clock=clock,
        observers=[clock],
    )
    start = clock.now  # after start-up (where the speculative decoder times verification)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    return clock.now - start, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    "running, knee, accept, slow_every, fixed_below",
    [
        (16, 32, 0.5, 0, 0.8),  # verifying 16 x 5 tokens is far past the knee: drafting loses about 25%
        (16, 64, 0.3, 10, 0.9),  # poor acceptance, every tenth forward slowed
        (8, 64, 0.6, 0, None),  # drafting pays
    ],
)
def test_adaptive_speculation_on_a_modeled_accelerator(tiny_model_dir, running, knee, accept, slow_every, fixed_below):
    """Adaptive speculation on hardware whose forward cost is flat up to a knee and then linear (GPUs, AMX), modeled
    by a virtual clock over the real engine and drafter. Where drafting on every step loses (a chain of 4 at 16
    running), adaptive speculation is at least 0.98x plain batched decoding: it pays its warm-up and probes only;
    where drafting pays, it keeps at least 85% of fixed drafting's gain (it warms up and probes plain decoding;
    here it gains as much). Outputs stay autoregressive decoding's."""
    path = str(tiny_model_dir)
    plain, want = _on_roofline(path, running, knee, accept, slow_every=slow_every)
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 4}
    fixed, _ = _on_roofline(path, running, knee, accept, {**spec, "adaptive": False}, slow_every)
    adaptive, got = _on_roofline(path, running, knee, accept, spec, slow_every)
    assert got == want
    if fixed_below is not None:
        assert plain / fixed < fixed_below  # the case is one where drafting loses...
        assert plain / adaptive >= 0.98  # ... and adaptive speculation does not
    else:
        assert plain / fixed > 1.2
        assert plain / adaptive >= 1 + 0.85 * (plain / fixed - 1)
