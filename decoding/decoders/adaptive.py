"""Adaptive speculation: per step, draft or decode plainly, whichever commits more tokens per second here.

The rule, per batch-size bucket (decoding sequences rounded up to a power of two):

1. Time both modes on steps without prompt tokens (not the first after a switch: a draft model catches up on it);
   the rate of a mode is committed tokens per sequence per second of whole steps.
2. Run the faster one; drafting only if `draft_margin` times faster and measured on `confirm` times the usual
   number of timed steps (near parity, plain decoding is the safe side). A drafting rate older than the running
   plain decoding's (which falls as contexts grow) does not count as faster where `predict` expects otherwise.
3. Now and then probe the other mode; each probe that changes nothing doubles the gap to the next, and a dear
   probe is spaced so that probing costs at most `probe_cost` of throughput. A probe of drafting that could not
   switch the bucket, because the tree sizer's model (`predict`) expects drafting below `draft_margin` times plain
   decoding's rate, is skipped, up to `probe_cost_max` steps after the last one; one the model expects to switch
   it is not spaced for cost, only backed off.
4. A new bucket above one that chose plain decoding (below one that chose drafting) starts with that choice.
   Where neither decides but a smaller bucket has drafted, `bound` gives a rate drafting would not exceed here
   (at that bucket's costs): plain decoding warms up first, and if the bound is under `draft_margin` times its
   rate, drafting is left to the probes, which the bound also skips.

Each threshold, its value and the measurements behind it: `docs/adaptive-speculation.md`.

| threshold | value | meaning |
|---|---|---|
| `rate_decay` | 0.9 | mean tokens per step: even over a run's first timed steps, then this weight of the past |
| `step_window` | 9 | seconds per step: the median of this many last timed steps (noise only adds time) |
| `samples`, `min_samples` | 3, 2 | timed steps a decision rests on: ceil(samples / n) for n sequences, at least 2 |
| `probe_min`, `probe_max` | 16, 256 | steps between probes: from 16, doubled by each probe that changes nothing |
| `probe_cost`, `probe_cost_max` | 0.01, 2048 | ... or far enough apart that probing costs this share; at most 2048 |
| `probe_patience` | 4 | a probe whose steps carry prompt tokens (untimed) ends after this many times its length |
| `draft_margin` | 1.05 | drafting runs only when measured this much faster |
| `confirm` | 3 | ... on at least this many times a decision's timed steps |
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    """The policy's numbers (the table above)."""

    rate_decay: float = 0.9
    step_window: int = 9
    samples: int = 3
    min_samples: int = 2
    probe_min: int = 16
    probe_max: int = 256
    probe_cost: float = 0.01
    probe_cost_max: int = 2048
    probe_patience: int = 4
    draft_margin: float = 1.05
    confirm: int = 3


THRESHOLDS = Thresholds()


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
    """What one batch-size bucket has measured of both modes, and where its probing stands."""

    times: dict[bool, deque[float]]  # drafting? -> seconds of its last timed steps (a window of step_window)
    interval: int  # back-off: steps from one probe to the next, unless probes are dear (_probe_gap)
    tokens: dict[bool, float] = field(default_factory=dict)  # drafting? -> mean tokens per sequence per step
    timed: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    opening: dict[bool, _Run] = field(default_factory=dict)  # drafting? -> the opening steps of its last run
    assumed: bool | None = None  # the mode other buckets imply is faster: the other one is only probed, not warmed up
    best: bool | None = None  # the faster mode at the last choice
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
    """Drafting or plain decoding, per batch-size bucket: the rule is the module's docstring, its numbers are
    `Thresholds`. The decoder asks `choose` before a step and reports the step to `record` after it."""

    def __init__(
        self,
        thresholds: Thresholds = THRESHOLDS,
        predict: Callable[[int], float | None] | None = None,
        bound: Callable[[int], float | None] | None = None,
    ) -> None:
        self.th = thresholds
        self.predict = predict  # n sequences -> drafting's expected rate (tokens per sequence per second), or None
        self.bound = bound  # n -> a rate drafting would not exceed, known before it is measured at n, or None
        self.buckets: dict[int, _Bucket] = {}
        self.last: bool | None = None  # the previous step's mode
        self.run: _Run | None = None  # the current run of a mode in a bucket

    @staticmethod
    def _bucket(num_decoding: int) -> int:
        """Decoding sequences rounded up to a power of two."""
        return 1 << (num_decoding - 1).bit_length()

    def _samples(self, size: int) -> int:
        """Timed steps a decision rests on, at this bucket size."""
        return max(self.th.min_samples, -(-self.th.samples // size))

    def choose(self, num_decoding: int, timeable: bool = True) -> bool:
        """Whether this step drafts. A step with prompt tokens (`timeable` false) drafts only where drafting is
        the bucket's choice: within a warm-up or probe of drafting it decodes plainly, without ending it, since
        it is never timed and drafting costs most there (the drafter also catches up on the new prompts)."""
        size = self._bucket(num_decoding)
        if size not in self.buckets:
            self.buckets[size] = _Bucket(
                times={m: deque(maxlen=self.th.step_window) for m in (False, True)},
                interval=self.th.probe_min,
                assumed=self._implied(size),
            )
        b = self.buckets[size]
        bound = self.bound(num_decoding) if self.bound and b.assumed is None and not b.timed[True] else None
        if bound is not None:  # drafting not yet measured here, a smaller bucket has been drafted in
            if b.timed[False] < self._samples(size):
                return False  # plain decoding warms up first: its rate tells whether drafting's warm-up could pay
            if bound < self.th.draft_margin * b.rate(False):
                b.assumed = False  # drafting loses even at a smaller batch's costs: left to the probes
        current = self.last is not False
        unwarmed = None if b.assumed is None else not b.assumed  # left to the probes
        for mode in (current, not current):
            if mode is not unwarmed and b.timed[mode] < self._samples(size):
                return mode and timeable
        if b.probing and b.probe_steps < self.th.probe_patience * (1 + self._samples(size)):  # decide when it is done
            b.probe_steps += 1
            return not b.best and timeable
        b.probing = 0
        if b.timed[True] and b.timed[False]:
            best = b.rate(True) >= self.th.draft_margin * b.rate(False)
            if best and b.best is not True and len(b.times[True]) < self.th.confirm * self._samples(size):
                stale = b.best is False and not (self.run and self.run.size == size and self.run.drafts)
                predicted = self._predicted_gain(num_decoding, b) if stale else None
                if predicted is None or predicted >= self.th.draft_margin:
                    b.probing, b.probe_steps = self._samples(size), 1  # time more drafting steps before switching
                    return timeable
                best = False  # an old drafting rate beside plain decoding's current one, which the model sides with
        else:  # the assumed mode is warmed up, the other not yet probed
            best = bool(b.assumed)
        if best != b.best:
            if b.best is not None:  # a probe (or drift) changed the choice: look again soon
                b.interval = self.th.probe_min
            b.best, b.since_probe = best, 0
        due = not best and timeable and b.since_probe >= b.interval - 1 - self._samples(size)  # no gap is shorter
        predicted = self._predicted_gain(num_decoding, b) if due else None
        if due and predicted is None:  # a bound only ever tells that a probe is useless
            upper = self._predicted_gain(num_decoding, b, self.bound)
            predicted = upper if upper is not None and upper < self.th.draft_margin else None
        gap = b.interval if predicted is not None and predicted >= self.th.draft_margin else self._probe_gap(size, best)
        if not timeable or b.since_probe < gap - 1 - self._samples(size):
            b.since_probe += 1
            return best
        if predicted is not None and predicted < self.th.draft_margin and b.since_probe < self.th.probe_cost_max:
            b.since_probe += 1
            return best
        b.probing, b.probe_steps, b.since_probe = self._samples(size), 1, 0
        b.interval = min(2 * b.interval, self.th.probe_max)
        return not best

    def _probe_gap(self, size: int, best: bool) -> int:
        """Steps from one probe to the next: the back-off interval, or more where a probe is dear, so that its
        measured loss (`_Bucket.probe_loss`, in steps) stays within `probe_cost` of the gap. The loss comes from
        this bucket once it has run both modes, else from the nearest bucket that has."""
        by_distance = sorted(self.buckets, key=lambda s: (abs(s.bit_length() - size.bit_length()), s))
        loss = next((x for x in (self.buckets[s].probe_loss(best) for s in by_distance) if x is not None), 0.0)
        return max(self.buckets[size].interval, min(self.th.probe_cost_max, math.ceil(loss / self.th.probe_cost)))

    def _predicted_gain(
        self, num_decoding: int, b: _Bucket, predict: Callable[[int], float | None] | None = None
    ) -> float | None:
        """Drafting's expected rate here (`predict`, by default the model's) over plain decoding's measured one, or
        None without a prediction."""
        predict = predict or self.predict
        predicted = None if predict is None or not b.timed[False] else predict(num_decoding)
        return None if predicted is None else predicted / b.rate(False)

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
                weight = 1 - self.th.rate_decay if run.carried else max(1 / run.timed, 1 - self.th.rate_decay)
                b.tokens[drafted] = (1 - weight) * b.tokens.get(drafted, 0.0) + weight * tokens
                if run.timed == 1 and not run.carried:  # a fresh measurement: forget the old step times
                    b.times[drafted].clear()
                b.times[drafted].append(seconds)
                b.timed[drafted] += 1
                if b.probing and drafted is not b.best:
                    b.probing -= 1
        self.last = drafted
