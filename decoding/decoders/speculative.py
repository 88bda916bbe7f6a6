"""Speculative decoding: a drafter proposes a candidate tree per sequence, the target verifies all of them in one
forward, and each sequence commits its own accepted path plus a bonus token.

Layouts (EMS-SD, seed-methods section 1): `packed` concatenates every sequence's `[last token] + candidates`
with no padding, each with its own count (0 allowed), and each sequence advances by its own accepted length;
`padded` reproduces the vanilla baseline: every drafting sequence drafts the same number of tokens, is padded
with dummy rows to the batch's widest tree, and advances its cache by the batch's longest accepted path, the
shortfall left as masked slots (`Sequence.kv_holes`, hidden from attention by the kernel's `context_mask`), so
`padded` pays for the padded rows and for the padded slots' memory and attention reads. Outputs are the same.

Adaptive speculation (`adaptive`): per step, `ModeSelector` picks drafting or plain decoding (every budget 0,
the same forward as the autoregressive decoder) by measured committed tokens per sequence per second in the
step's batch-size bucket, so that speculation is switched off where it does not pay, e.g. at high concurrency on a
compute-bound device; while drafting, each sequence's budget follows its own acceptance.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch

from leapserve.kernels import move_kv

from ..config import EngineConfig, SpeculativeConfig
from ..drafter import DraftTree, make_drafter
from ..request import Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sampler, SequenceError, row_argmax
from ..scheduler import ScheduledSeq
from ..tree import chunk_layout
from ..verification import verify
from .base import Decoder, SeqStep

EMA_DECAY = 0.7  # weight of the past in the per-sequence EMA of accepted tokens per step
# A bucket's estimates per mode: tokens per sequence per step, a mean (evenly over a run's first timed steps, then
# exponential with this weight of the past); seconds per step, the median of the last STEP_WINDOW timed steps:
# noise only ever adds time (another process taking the CPU), and a mean would hold a rare slow step against the
# mode that ran longest, so that a probe of a few steps would usually look faster than it is.
RATE_DECAY = 0.9
STEP_WINDOW = 9
# Timed steps of a mode a decision rests on (warm-up, and each probe after its untimed first step): 3 for one
# sequence, whose drafting step commits anywhere from 1 to depth + 1 tokens; for n sequences ceil(3 / n), whose
# committed tokens add up and vary less, but at least 2: their acceptance moves together (one step's mean over 15
# requests still varied by about 20%), and one lucky drafting step must not switch a whole bucket to drafting.
SAMPLES, MIN_SAMPLES = 3, 2
PROBE_MIN, PROBE_MAX = 16, 256  # steps between probes: from PROBE_MIN, doubled by each probe that changes nothing
PROBE_COST = 0.01  # ... and at least far enough apart that probing costs at most this share of throughput,
PROBE_COST_MAX = 2048  # ... up to this many steps (a dear mode is still re-timed now and then)
PROBE_PATIENCE = 4  # a probe whose steps carry prompt tokens (not timed) ends after this many times its length
DRAFT_MARGIN = 1.1  # drafting runs only when measured this much faster: near parity, plain decoding is the safe side
# ... on at least CONFIRM times a decision's timed steps: acceptance varies enough over a few steps that, at 4 requests
# in fp32, one of about ten probes of a drafter 25% slower than plain decoding found it faster and switched to it.
CONFIRM = 3


@dataclass
class StepRecord:
    """One speculative step as timed for the mode choice (`SpeculativeDecoder.step_log`, read by benchmarks)."""
    drafted: bool  # some sequence drafted
    num_decoding: int  # sequences that committed tokens (or could have)
    prompt_tokens: int  # tokens computed beyond one per decoding sequence: prompt chunks
    tokens: int  # committed
    seconds: float


@dataclass
class _Run:
    """Consecutive steps of one mode in one bucket; `seconds` and `tokens` add up its first steps without prompt
    tokens, as many as a probe has (the first after a switch included: a draft model catches up on it)."""
    size: int
    drafts: bool
    steps: int = 0
    seconds: float = 0.0
    tokens: float = 0.0  # per sequence
    carried: bool = False  # goes on with the bucket's averages instead of restarting them
    timed: int = 0  # its steps that entered the bucket's averages


@dataclass
class _Bucket:
    tokens: dict[bool, float] = field(default_factory=dict)  # drafting? -> mean tokens per sequence per step
    times: dict[bool, deque[float]] = field(  # drafting? -> seconds of its last timed steps
        default_factory=lambda: {m: deque(maxlen=STEP_WINDOW) for m in (False, True)})
    timed: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    opening: dict[bool, _Run] = field(default_factory=dict)  # drafting? -> the opening steps of its last run
    assumed: bool | None = None  # the mode other buckets imply is faster: the other one is only probed, not warmed up
    best: bool | None = None  # the faster mode at the last choice
    interval: int = PROBE_MIN  # back-off: steps from one probe to the next, unless probes are dear (_probe_gap)
    since_probe: int = 0  # steps of the best mode since the last probe (or change of choice)
    probing: int = 0  # timed steps the current probe still needs
    probe_steps: int = 0  # steps the current probe has run

    def rate(self, drafts: bool) -> float:
        """Committed tokens per sequence per second (a ratio of averages: a step's tokens and time go together)."""
        return self.tokens[drafts] / self.seconds(drafts)

    def seconds(self, drafts: bool) -> float:
        """Seconds per step: the median of the last timed steps."""
        return statistics.median(self.times[drafts])

    def probe_loss(self, best: bool) -> float | None:
        """What a probe of the other mode costs, in steps of `best`: the seconds its last run's opening steps
        took beyond those `best` would have needed for the same tokens. None until both are measured."""
        run = self.opening.get(not best)
        if run is None or not run.steps or not (self.timed[True] and self.timed[False]):
            return None
        return max(0.0, run.seconds - run.tokens / self.rate(best)) / self.seconds(best)


class ModeSelector:
    """Drafting or plain decoding, per batch-size bucket (decoding sequences rounded up to a power of two), by measured
    committed tokens per sequence per second of whole steps (per sequence: the batch size varies within a
    bucket, and both modes must be judged at the same size): the faster mode runs (drafting only if DRAFT_MARGIN
    times faster, and only on CONFIRM times as many timed steps: a probe that finds drafting faster goes on until
    it has them); the other is re-timed now and then (a probe: one untimed step, then `_samples` timed ones), so
    that a change (longer contexts, other prompts) is noticed. Only steps without prompt tokens, and not the
    first step after a switch (a draft model catches up on it), are timed; a probe lasts until it has its timed
    steps (at most PROBE_PATIENCE times its length), and only then decides; its steps with prompt tokens decode
    plainly. A probed mode is measured afresh, not averaged with its past; the best mode, back after a probe,
    goes on with its averages.

    Probes back off: each one that leaves the choice as it was doubles the gap to the next (PROBE_MIN up to
    PROBE_MAX steps), and the gap is never shorter than what keeps the measured cost of probing (the first step
    included) under PROBE_COST of throughput (up to PROBE_COST_MAX steps), so a mode that costs several times
    the other (a big tree at high concurrency) is re-timed rarely; a change of choice brings the gap back to
    PROBE_MIN. Drafting pays less as the batch grows, so a new bucket above one that chose plain decoding (or
    below one that chose drafting) starts with that choice and leaves the other mode to the probes instead of
    warming it up: a batch that grows from 8 to 16 requests does not pay several drafting steps to learn again
    that drafting loses."""

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket] = {}
        self.last: bool | None = None  # the previous step's mode
        self.run: _Run | None = None  # the current run of a mode in a bucket

    @staticmethod
    def _bucket(num_decoding: int) -> int:
        """Decoding sequences rounded up to a power of two."""
        return 1 << (num_decoding - 1).bit_length()

    @staticmethod
    def _samples(size: int) -> int:
        return max(MIN_SAMPLES, -(-SAMPLES // size))

    def choose(self, num_decoding: int, timeable: bool = True) -> bool:
        """Whether this step drafts. A step with prompt tokens (`timeable` false) drafts only where drafting is
        the bucket's choice: within a warm-up or probe of drafting it decodes plainly, without ending it, since
        it is never timed and drafting costs most there (the drafter also catches up on the new prompts)."""
        size = self._bucket(num_decoding)
        if size not in self.buckets:
            self.buckets[size] = _Bucket(assumed=self._implied(size))
        b = self.buckets[size]
        current = self.last is not False
        unwarmed = None if b.assumed is None else not b.assumed  # left to the probes
        for mode in (current, not current):
            if mode is not unwarmed and b.timed[mode] < self._samples(size):
                return mode and timeable
        if b.probing and b.probe_steps < PROBE_PATIENCE * (1 + self._samples(size)):  # decide when it is done
            b.probe_steps += 1
            return not b.best and timeable
        b.probing = 0
        if b.timed[True] and b.timed[False]:
            best = b.rate(True) >= DRAFT_MARGIN * b.rate(False)
            if best and b.best is not True and len(b.times[True]) < CONFIRM * self._samples(size):
                b.probing, b.probe_steps = self._samples(size), 1  # time more drafting steps before switching
                return timeable
        else:  # the assumed mode is warmed up, the other not yet probed
            best = bool(b.assumed)
        if best != b.best:
            if b.best is not None:  # a probe (or drift) changed the choice: look again soon
                b.interval = PROBE_MIN
            b.best, b.since_probe = best, 0
        if not timeable or b.since_probe < self._probe_gap(size, best) - 1 - self._samples(size):
            b.since_probe += 1
            return best
        b.probing, b.probe_steps, b.since_probe = self._samples(size), 1, 0
        b.interval = min(2 * b.interval, PROBE_MAX)
        return not best

    def _probe_gap(self, size: int, best: bool) -> int:
        """Steps from one probe to the next: the back-off interval, or more where a probe is dear, so that its
        measured loss (`_Bucket.probe_loss`, in steps) stays within PROBE_COST of the gap. The loss comes from
        this bucket once it has run both modes, else from the nearest bucket that has."""
        by_distance = sorted(self.buckets, key=lambda s: (abs(s.bit_length() - size.bit_length()), s))
        loss = next((x for x in (self.buckets[s].probe_loss(best) for s in by_distance) if x is not None), 0.0)
        return max(self.buckets[size].interval, min(PROBE_COST_MAX, math.ceil(loss / PROBE_COST)))

    def _implied(self, size: int) -> bool | None:
        """Plain decoding if a smaller bucket found it faster, drafting if a larger one found drafting faster."""
        if any(b.best is False for s, b in self.buckets.items() if s < size):
            return False
        if any(b.best is True for s, b in self.buckets.items() if s > size):
            return True
        return None

    def record(self, num_decoding: int, drafted: bool, tokens: float, seconds: float, timeable: bool) -> None:
        """One step's outcome: `tokens` committed (over all sequences) in `seconds` of wall time."""
        size, tokens = self._bucket(num_decoding), tokens / num_decoding
        b = self.buckets[size]
        if not (drafted or timeable) and self.last is True and b.best is not True:
            return  # a prompt step decoded plainly within a warm-up or probe of drafting: it neither ends nor joins it
        run = self.run
        if run is None or (run.size, run.drafts) != (size, drafted):
            # The best mode, back after a probe, goes on with its averages; any other run measures afresh.
            run = self.run = _Run(size, drafted, carried=drafted is b.best and b.timed[drafted] > 0)
            b.opening[drafted] = run
        if timeable and seconds > 0:
            if run.steps <= self._samples(size):
                run.steps, run.seconds, run.tokens = run.steps + 1, run.seconds + seconds, run.tokens + tokens
            if self.last is drafted:
                run.timed += 1
                weight = 1 - RATE_DECAY if run.carried else max(1 / run.timed, 1 - RATE_DECAY)
                b.tokens[drafted] = (1 - weight) * b.tokens.get(drafted, 0.0) + weight * tokens
                if run.timed == 1 and not run.carried:  # a fresh measurement: forget the old step times
                    b.times[drafted].clear()
                b.times[drafted].append(seconds)
                b.timed[drafted] += 1
                if b.probing and drafted is not b.best:
                    b.probing -= 1
        self.last = drafted


class SpeculativeDecoder(Decoder):
    name = "speculative"

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig):
        super().__init__(runner, sampler, config)
        if not config.speculative_config:
            raise ValueError('decoder "speculative" needs a speculative_config, e.g. '
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        self.spec = SpeculativeConfig.from_dict(config.speculative_config)
        self.drafter = make_drafter(self.spec, runner, sampler)
        self.lookahead = self.drafter.lookahead
        self.max_nodes = self.drafter.max_nodes
        self.max_depth = self.drafter.max_depth
        self._accept_ema: WeakKeyDictionary[Sequence, float] = WeakKeyDictionary()
        self.selector = ModeSelector()
        self.clock: Callable[[], float] = time.perf_counter
        self._step_start = 0.0
        self._step_drafts: bool | None = None  # this step's mode, when the selector chose it
        self._step_timeable = False  # this step carries no prompt tokens: its time measures its mode
        self.step_log: list[StepRecord] | None = None  # a list: every step is appended to it

    def _budgets(self, scheduled: list[ScheduledSeq]) -> list[int]:
        """Draft tokens per sequence: none while prefilling; at most what max_tokens leaves; adaptive: none when
        the selector picks plain decoding, else sized by the sequence's recent acceptance and shrunk as the batch
        grows. Starts the step's clock."""
        self._step_start = self.clock()
        drafting = [s for s in scheduled if s.completes_prefix]
        self._step_timeable = all(s.num_new == 1 for s in scheduled)
        self._step_drafts = (self.selector.choose(len(drafting), self._step_timeable)
                             if self.spec.adaptive and drafting else None)
        cap = self.max_nodes
        if self._step_drafts is False:
            cap = 0
        elif self.spec.adaptive and drafting:
            cap = min(cap, self.spec.max_batch_draft_tokens // len(drafting))
        budgets = []
        for s in scheduled:
            if not s.completes_prefix:
                budgets.append(0)
                continue
            seq = s.seq
            left = (seq.params.max_tokens or 1 << 30) - seq.num_output - 1  # the bonus token always comes
            budget = cap if left >= self.max_depth else min(cap, left)
            if self.spec.adaptive:
                ema = self._accept_ema.get(seq, float(self.max_depth))
                budget = min(budget, math.ceil(self.max_nodes * min(1.0, (ema + 1) / self.max_depth)))
            budgets.append(max(0, budget))
        if self.spec.layout == "padded":  # vanilla: one draft length for the whole batch
            width = max(budgets, default=0)
            budgets = [width if s.completes_prefix else 0 for s in scheduled]
        return budgets

    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        budgets = self._budgets(scheduled)
        trees = self.drafter.propose(scheduled, budgets)
        width = max(budgets, default=0)
        chunks = [self._chunk(s, t, width - len(t) if self.spec.layout == "padded" and s.completes_prefix else 0)
                  for s, t in zip(scheduled, trees)]
        hidden = None
        if getattr(self.drafter, "needs_target_features", False):
            logits, hidden = self.runner.forward(chunks)
        else:
            logits = self.runner.execute(chunks)
        results: dict[Sequence, SeqStep] = {}
        observed: list[tuple[Sequence, list[int]]] = []  # feature drafters: each sequence's hidden rows to observe
        argmax = row_argmax(logits, [s.seq for s in scheduled if s.completes_prefix])
        row = lo = 0
        for s, tree, chunk in zip(scheduled, trees, chunks):
            lo, chunk_lo = lo + len(chunk.token_ids), lo
            if not s.completes_prefix:
                if hidden is not None:
                    observed.append((s.seq, list(range(chunk_lo, lo))))
                results[s.seq] = SeqStep()
                continue
            seq_logits = logits[row:row + len(tree) + 1]
            seq_argmax = None if argmax is None else argmax[row:row + len(tree) + 1]
            row += len(tree) + 1
            try:
                accepted, samples = verify(tree, seq_logits, s.seq, self.sampler, seq_argmax)
            except SequenceError as e:
                results[s.seq] = SeqStep(error=e)
                continue
            self._compact(s.seq, s.seq.num_kv_slots + s.num_new - 1, accepted)
            if hidden is not None:  # the features of every token this step computed and committed
                root = chunk_lo + s.num_new - 1
                observed.append((s.seq, list(range(chunk_lo, root + 1)) + [root + node for node in accepted]))
            if len(tree):
                old = self._accept_ema.get(s.seq, float(self.max_depth))
                self._accept_ema[s.seq] = EMA_DECAY * old + (1 - EMA_DECAY) * len(accepted)
            results[s.seq] = SeqStep(samples=samples, forwarded=True, draft_tokens=len(tree),
                                     accepted_tokens=len(accepted))
        if self.spec.layout == "padded":  # vanilla: every sequence advances by the batch's longest accepted path
            verified = [results[s.seq] for s in scheduled if s.completes_prefix and results[s.seq].forwarded]
            longest = max((r.accepted_tokens for r in verified), default=0)
            for r in verified:
                r.masked_slots = longest - r.accepted_tokens
        if observed:  # one gather for the whole batch, then a view per sequence
            rows = torch.tensor([r for _, seq_rows in observed for r in seq_rows], device=hidden.device)
            for (seq, seq_rows), features in zip(observed, hidden[rows].split([len(r) for _, r in observed])):
                self.drafter.observe(seq, seq.num_computed, features)
        self._time_step(scheduled, results)
        return results

    def _time_step(self, scheduled: list[ScheduledSeq], results: dict[Sequence, SeqStep]) -> None:
        """Report the step's committed tokens and wall time to the selector (steps with prompt tokens excluded),
        and to `step_log`."""
        decoding = [s for s in scheduled if s.completes_prefix]
        tokens, seconds = sum(len(results[s.seq].samples) for s in decoding), self.clock() - self._step_start
        if self.step_log is not None:
            self.step_log.append(StepRecord(any(r.draft_tokens for r in results.values()), len(decoding),
                                            sum(s.num_new for s in scheduled) - len(decoding), tokens, seconds))
        if self._step_drafts is not None:
            self.selector.record(len(decoding), self._step_drafts, tokens, seconds, self._step_timeable)

    @staticmethod
    def _chunk(s: ScheduledSeq, tree: DraftTree, num_pad: int) -> SeqChunk:
        """`[tokens to compute] + candidates (+ pads)`; logits at the root and at every candidate. The chunk
        starts at the sequence's next free cache slot; rotary positions count tokens (holes take none)."""
        seq = s.seq
        start = seq.num_computed
        prefix = seq.token_ids[start:start + s.num_new]
        rows = list(range(len(prefix) - 1, len(prefix) + len(tree))) if s.completes_prefix else []
        tokens, offsets, mask = prefix, range(len(prefix)), None
        if s.completes_prefix and (len(tree) or num_pad):
            mask, offsets = chunk_layout(len(prefix), tree.parents, num_pad)
            tokens = prefix + tree.tokens + [prefix[-1]] * num_pad
        return SeqChunk(seq.block_table, seq.num_kv_slots, tokens, logits_rows=rows,
                        positions=[start + o for o in offsets], tree_mask=mask, context_holes=seq.kv_holes)

    def _compact(self, seq: Sequence, root: int, accepted: list[int]) -> None:
        """Move the accepted nodes' K/V (node i sits at cache slot root + i) to root + 1, root + 2, ..."""
        moves = [(root + node, root + depth) for depth, node in enumerate(accepted, start=1) if node != depth]
        if not moves:
            return
        cache = self.runner.cache
        bs = cache.block_size

        def slots(positions: list[int]) -> torch.Tensor:
            return torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in positions], dtype=torch.int64,
                                device=self.runner.device)

        src, dst = slots([m[0] for m in moves]), slots([m[1] for m in moves])
        for k, v in zip(cache.k, cache.v):
            move_kv(k, v, src, dst)
