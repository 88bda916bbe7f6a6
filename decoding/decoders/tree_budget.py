"""Tree budgets sized by cost: while drafting, the draft nodes per sequence that commit the most tokens per second
at the step's batch size.

A drafter lists a tree's nodes best first (`DraftTree`), so a budget of n keeps its first n nodes, and the n-th
node is what raising the budget from n - 1 to n buys. For a drafting step over N sequences:

1. Verifying T tokens costs V(T), timed at start-up (`VerifyCost.measure`: the fastest of three target forwards
   over T tokens for every T up to 8 and powers of two beyond, up to the most a step verifies, taken in turn;
   linear in between, never decreasing). On a GPU or an AMX CPU V is flat and then linear; on an AVX2 CPU it
   grows from the first token.
2. Every verified tree tells, for each rank r within its budget, whether its r-th node was accepted: p_r is that
   share (counts decayed by `decay` per tree, so that p follows the traffic).
3. A proposal growing l levels costs D_N(l), a line through the median proposal times at the fewest and the
   most levels seen among the last `draft_window` timed drafting steps in N's bucket (powers of two; through
   the origin while one level count is seen); the rest of a drafting step (sampling, verification,
   bookkeeping: its time less the proposal's and V of the tokens it verified) is R_N, their median. A budget
   of n grows min(n, depth) levels.
4. The budget is the n in 1..cap maximising (1 + p_1 + ... + p_n) / (R_N + D_N(min(n, depth)) + V(N (1 + n))):
   tokens committed per sequence per second of a whole drafting step.
5. Until every p_r up to cap is measured (`min_trials` trees), the budget is cap; until D_N and R_N are, those of
   the largest smaller bucket drafted in stand in (cap where there is none), so that a batch size's first drafting
   steps (a probe, which also catches the drafter up on its prompts) do not verify whole trees. After that, every
   `explore_every`-th drafting step one sequence (in turn) drafts one node more than the budget, so that the next
   rank and the cost of one more level stay measured: the budget moves a rank at a time, never paying for the
   whole tree again. Where one more node and level cost much of a step (one request on a CPU: a fifth), the
   explorations are spaced so that they cost at most `explore_cost` of drafting's time.
6. V was timed once, at the machine's best (the fastest of three); the machine may slow down since (another load,
   another hour). Timed plain steps measure that: the median of the last `drift_window` of them in N's bucket
   (seconds over V of their sequences; few, since while drafting pays plain steps come only in the mode
   selector's probes, a few steps each) over the median of the first `draft_window` is the drift, at least 1 (V
   is never priced below its timing: the first steps after start-up can read slow), and V is priced times the
   drift in steps 3 and 4. Without it a machine that slows down puts the slower verification into R_N, beside
   which each further node looks cheap, and the trees grow as drafting pays less.

Whether to draft at all is `adaptive.ModeSelector`'s choice; this sizes the tree when it does. Measurements
behind the numbers: `docs/adaptive-speculation.md`.

| threshold | value | meaning |
|---|---|---|
| `decay` | 0.995 | weight of the past in a rank's counts, per tree whose budget reaches it |
| `min_trials` | 8 | trees whose budget reaches a rank before its acceptance is used |
| `draft_window` | 16 | timed drafting steps per bucket that D_N and R_N are measured on |
| `explore_every` | 4 | every this many drafting steps, one sequence drafts one node beyond the budget ... |
| `explore_cost`, `explore_max` | 0.02, 64 | ... or far enough apart that exploring costs this share; at most 64 |
| `drift_window` | 3 | the last plain steps per bucket whose median, over the first `draft_window`'s, is the drift |
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """The sizer's numbers (the table above)."""

    decay: float = 0.995
    min_trials: int = 8
    draft_window: int = 16
    explore_every: int = 4
    explore_cost: float = 0.02
    explore_max: int = 64
    drift_window: int = 3


THRESHOLDS = Thresholds()

# Verification is timed at every token count up to this one: few rows do not cost a smooth curve (on cpu-2c-avx512,
# fp32, while the compiled path's own GEMM loop took three rows, three cost more than four through oneDNN).
EVERY_SIZE_UP_TO = 8


class VerifyCost:
    """Seconds of a target forward over T tokens: measured points, linear between them and beyond the last two,
    made non-decreasing (a point below an earlier one is timing noise)."""

    def __init__(self, points: dict[int, float]):
        if not points:
            raise ValueError("VerifyCost needs at least one measured point")
        self.tokens = sorted(points)
        self.seconds = list(itertools.accumulate((points[t] for t in self.tokens), max))

    @classmethod
    def measure(cls, time_forward: Callable[[int], float], max_tokens: int, rounds: int = 3) -> VerifyCost:
        """The fastest of `rounds` calls of `time_forward(T)` at every T up to `EVERY_SIZE_UP_TO`, then at powers of
        two up to `max_tokens` (and at `max_tokens`), the sizes taken in turn each round: a size timed only right
        after compilation, or only after another, can read slow, and one slow point skews every budget it prices."""
        powers = {1 << i for i in range(max_tokens.bit_length()) if 1 << i <= max_tokens} | {max_tokens}
        counts = sorted(powers | set(range(1, min(EVERY_SIZE_UP_TO, max_tokens) + 1)))
        best = dict.fromkeys(counts, float("inf"))
        for _ in range(rounds):
            for t in counts:
                best[t] = min(best[t], time_forward(t))
        return cls(best)

    def __call__(self, tokens: int) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0]
        hi = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        lo = hi - 1
        return max(ys[0], ys[lo] + (ys[hi] - ys[lo]) * (tokens - xs[lo]) / (xs[hi] - xs[lo]))

    def describe(self) -> str:
        return ", ".join(f"{t}: {1e3 * s:.1f} ms" for t, s in zip(self.tokens, self.seconds))


class TreeSizer:
    """Per drafting step, each sequence's node budget (the module's docstring); the decoder asks `budgets` before
    drafting, and reports each verified tree to `record_tree` and each timed drafting step to `record_step`."""

    def __init__(self, verify_cost: VerifyCost, max_nodes: int, depth: int, thresholds: Thresholds = THRESHOLDS):
        self.verify_cost = verify_cost
        self.depth = depth
        self.th = thresholds
        self.hits = [0.0] * max_nodes  # [r - 1]: decayed count of trees that accepted their r-th node
        self.trials = [0.0] * max_nodes  # [r - 1]: decayed count of trees whose budget reached rank r
        # bucket -> (levels, proposal seconds, rest seconds) of its last timed drafting steps
        self.timed: dict[int, deque[tuple[int, float, float]]] = {}
        # bucket -> timed plain steps' seconds over V of their sequences: the first `draft_window`, the last
        # `drift_window`
        self.plain_first: dict[int, list[float]] = {}
        self.plain_last: dict[int, deque[float]] = {}
        self.steps = 0  # drafting steps asked for
        self.explored, self.since_explored = 0, 0  # steps that explored one rank beyond; steps since the last
        self.measuring = True  # whether the last `budgets` drafted the cap because it could not size the trees yet

    @staticmethod
    def _bucket(num_decoding: int) -> int:
        return 1 << (num_decoding - 1).bit_length()

    def acceptance(self) -> list[float | None]:
        """p_r for r = 1, 2, ...: None where not yet measured on `min_trials` trees."""
        return [h / t if t >= self.th.min_trials else None for h, t in zip(self.hits, self.trials)]

    def best_budget(self, num_decoding: int, cap: int) -> int:
        """The budget of step 4, with step 5's stand-ins (cap while they cannot size it)."""
        best = self._sized(num_decoding, cap)
        return cap if best is None else best[0]

    def _sized(self, num_decoding: int, cap: int) -> tuple[int, float] | None:
        """Step 4's (budget, rate) at N's own costs, else at the largest smaller bucket's (step 5), else None."""
        return self._best(num_decoding, cap) or self._best(num_decoding, cap, from_smaller=True)

    def predicted_rate(self, num_decoding: int, cap: int, from_smaller: bool = False) -> float | None:
        """Tokens per sequence per second that drafting at the best budget is expected to commit here (step 4's
        maximum), or None while D_N or some p_r up to cap is not measured yet. `from_smaller`: with D and R of the
        largest smaller bucket drafted in, which grow with the batch: a rate drafting here would not exceed, known
        before this bucket's own first drafting steps, which also catch the drafter up on its prompts."""
        best = self._best(num_decoding, cap, from_smaller)
        return None if best is None else best[1]

    def _best(self, num_decoding: int, cap: int, from_smaller: bool = False) -> tuple[int, float] | None:
        """Step 4's (budget, rate), or None while it cannot be computed."""
        p = [x for x in self.acceptance()[:cap] if x is not None]
        seconds = self._step_seconds(num_decoding, from_smaller)
        if seconds is None or not p or len(p) < cap:
            return None
        best, best_rate, tokens = cap, 0.0, 1.0
        for n, p_n in enumerate(p, start=1):
            tokens += p_n
            rate = tokens / max(seconds(n, num_decoding * (1 + n)), 1e-9)
            if rate > best_rate:
                best, best_rate = n, rate
        return best, best_rate

    def drift(self, num_decoding: int) -> float:
        """Step 6: how many times as long as in their first window plain steps here take now, at least 1 (1 until
        that window is full)."""
        bucket = self._bucket(num_decoding)
        first = self.plain_first.get(bucket, [])
        if len(first) < self.th.draft_window:
            return 1.0
        return max(1.0, statistics.median(self.plain_last[bucket]) / statistics.median(first))

    def _step_seconds(self, num_decoding: int, from_smaller: bool = False) -> Callable[[int, int], float] | None:
        """Seconds of a drafting step here as a function of (budget, tokens verified), or None before one is timed
        (`from_smaller`: in the largest smaller bucket)."""
        bucket = self._bucket(num_decoding)
        if from_smaller:
            window = next((self.timed[b] for b in sorted(self.timed, reverse=True) if b < bucket), None)
        else:
            window = self.timed.get(bucket)
        if not window:
            return None
        draft = _drafting_cost(window)
        rest = statistics.median(r for *_, r in window)
        drift = self.drift(num_decoding)
        return lambda budget, tokens: rest + draft(min(budget, self.depth)) + drift * self.verify_cost(tokens)

    def _explore_gap(self, num_decoding: int, budget: int) -> int:
        """Drafting steps between explorations: `explore_every`, or more where one more node (and level) costs so
        much of a step that exploring as often would cost over `explore_cost` of drafting's time."""
        seconds = self._step_seconds(num_decoding)
        if seconds is None:
            return self.th.explore_every
        base = seconds(budget, num_decoding * (1 + budget))
        extra = seconds(budget + 1, num_decoding * (1 + budget) + 1) - base
        gap = math.ceil(extra / max(self.th.explore_cost * base, 1e-12))
        return min(max(gap, self.th.explore_every), self.th.explore_max)

    def budgets(self, num_decoding: int, cap: int) -> list[int]:
        """Node budgets for the step's `num_decoding` drafting sequences, none above `cap`."""
        self.steps += 1
        found = self._sized(num_decoding, cap)
        self.measuring = found is None  # this step's trees take the whole cap to measure every rank
        best = cap if found is None else found[0]
        out = [best] * num_decoding
        if best < cap:
            self.since_explored += 1
            if self.since_explored >= self._explore_gap(num_decoding, best):
                self.explored, self.since_explored = self.explored + 1, 0
                out[self.explored % num_decoding] = best + 1
        return out

    def record_step(
        self, num_decoding: int, draft_seconds: float, levels: int, step_seconds: float, verified_tokens: int
    ) -> None:
        """A timed drafting step over `num_decoding` sequences: its proposal took `draft_seconds` to grow `levels`
        tree levels, the whole step `step_seconds`, and its target forward verified `verified_tokens` tokens."""
        if levels < 1:
            return
        window = self.timed.setdefault(self._bucket(num_decoding), deque(maxlen=self.th.draft_window))
        verify = self.drift(num_decoding) * self.verify_cost(verified_tokens)
        window.append((levels, draft_seconds, step_seconds - draft_seconds - verify))

    def record_plain(self, num_decoding: int, seconds: float) -> None:
        """A timed plain step over `num_decoding` sequences took `seconds` (step 6)."""
        bucket = self._bucket(num_decoding)
        ratio = seconds / self.verify_cost(num_decoding)
        first = self.plain_first.setdefault(bucket, [])
        if len(first) < self.th.draft_window:
            first.append(ratio)
        self.plain_last.setdefault(bucket, deque(maxlen=self.th.drift_window)).append(ratio)

    def record_tree(self, budget: int, accepted: list[int]) -> None:
        """One verified tree: its budget and its accepted nodes (1-based ranks, best first)."""
        taken = set(accepted)
        decay = self.th.decay
        for r in range(min(budget, len(self.trials))):
            self.trials[r] = decay * self.trials[r] + 1.0
            self.hits[r] = decay * self.hits[r] + (r + 1 in taken)


def _drafting_cost(window: deque[tuple[int, float, float]]) -> Callable[[int], float]:
    """Seconds of a proposal growing l levels: the line through the median times at the fewest and the most levels
    in `window`, or through the origin and the median where all grew as many."""
    by_levels: dict[int, list[float]] = {}
    for levels, seconds, _ in window:
        by_levels.setdefault(levels, []).append(seconds)
    lo, hi = min(by_levels), max(by_levels)
    at_lo, at_hi = statistics.median(by_levels[lo]), statistics.median(by_levels[hi])
    if lo == hi:
        return lambda levels: at_hi * levels / hi
    slope = max(0.0, (at_hi - at_lo) / (hi - lo))
    return lambda levels: max(0.0, at_lo + slope * (levels - lo))
