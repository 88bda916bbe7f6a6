"""Benchmark arithmetic, no I/O: latencies of streamed requests as vLLM's `bench serve` defines them, percentiles,
speculative-decoding acceptance from before/after counter scrapes, the offline throughput figures, and what
drafting cost against plain decoding within a pass (`drafting_cost`).

Definitions (times in seconds from `time.perf_counter`, reported in milliseconds):
- TTFT: from sending the request to the first chunk that carries output text.
- ITL: the gaps between consecutive chunks that carry output text (one chunk may carry several tokens).
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), for requests with at least two output tokens.
- Mean acceptance length: 1 + accepted draft tokens / verifications with drafts (vLLM's); acceptance rate:
  accepted / proposed draft tokens.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from leapserve.decoding.observe import StepRecord


@dataclass
class StreamedRequest:
    """One streamed request as the client saw it."""

    start: float
    end: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output text
    output_tokens: int | None = None  # the server's usage.completion_tokens; None: one token per chunk
    error: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times) if self.output_tokens is None else self.output_tokens

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        ttft, n = self.ttft, self.num_output_tokens
        return None if ttft is None or n < 2 else (self.e2e - ttft) / (n - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and p99 of durations in seconds, in milliseconds (None for no values)."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    return {
        "mean": 1e3 * statistics.fmean(values),
        "median": 1e3 * statistics.median(values),
        "p99": 1e3 * percentile(values, 99),
    }


def serve_summary(requests: Sequence[StreamedRequest], duration: float) -> dict:
    """One concurrency level: counts, throughput over the level's wall time, latency distributions."""
    ok = [r for r in requests if r.error is None]
    output_tokens = sum(r.num_output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(requests) - len(ok),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "ttft_ms": summary_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summary_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": summary_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": summary_ms([r.e2e for r in ok]),
    }


SPEC_DRAFTS = "spec_decode_num_drafts_total"
SPEC_DRAFT_TOKENS = "spec_decode_num_draft_tokens_total"
SPEC_ACCEPTED = "spec_decode_num_accepted_tokens_total"
SPEC_COUNTERS = (SPEC_DRAFTS, SPEC_DRAFT_TOKENS, SPEC_ACCEPTED)


def mean_acceptance_length(accepted: int | float, drafts: int | float) -> float:
    """Tokens committed per verification: 1 + accepted / drafts (1.0 when nothing was drafted)."""
    return 1.0 + accepted / drafts if drafts else 1.0


def spec_decode_stats(before: Mapping[str, float], after: Mapping[str, float]) -> dict | None:
    """Acceptance over an interval from two scrapes of the spec-decode counters (names without the server's
    prefix, see `SPEC_COUNTERS`); None when the server does not expose them."""
    if not all(name in before and name in after for name in SPEC_COUNTERS):
        return None
    drafts, draft_tokens, accepted = (after[name] - before[name] for name in SPEC_COUNTERS)
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": mean_acceptance_length(accepted, drafts),
    }


def drafting_cost(steps: Sequence[StepRecord]) -> float | None:
    """What drafting cost against plain decoding within one pass, as a share of the pass's step time: the seconds
    its drafting steps took beyond plain steps committing the same tokens, these priced by a least-squares fit
    t = a + b n + c P over the same pass's plain steps (n decoding sequences, P prompt tokens). Negative where
    drafting paid; immune to the machine's drift between passes. None without enough plain steps to fit, or without
    plain steps that only decode: prefill steps alone (every step of a fixed tree drafts) put a decode step's price
    out past their fit, at 16 running several times a whole step."""
    plain = [s for s in steps if not s.drafted]
    if len({(s.sequences, s.prompt_tokens) for s in plain}) < 3 or all(s.prompt_tokens for s in plain):
        return None if any(s.drafted for s in steps) else 0.0
    x = torch.tensor([[1.0, s.sequences, s.prompt_tokens] for s in plain], dtype=torch.float64)
    y = torch.tensor([[s.seconds] for s in plain], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(x, y).solution.flatten().tolist()
    excess = 0.0
    for s in steps:
        if s.drafted and s.sequences:
            decode = a + b * s.sequences  # a plain step without prompt tokens
            excess += s.seconds - (decode + c * s.prompt_tokens + (s.committed_tokens / s.sequences - 1) * decode)
    return excess / sum(s.seconds for s in steps)


@dataclass
class OfflineRun:
    """One timed pass of a decoder over the prompt set at one batch size."""

    output_tokens: int
    elapsed: float
    target_forwards: int  # forwards of the target model (one serves the whole batch)
    request_forwards: int  # summed over requests: the forwards each took part in
    accepted_tokens: int | None = None  # None: the decoder does not report acceptance (transformers' generate)
    num_drafts: int | None = None
    draft_tokens: int | None = None
    drafting_cost: float | None = None  # `drafting_cost` of the pass's steps; None: not a speculative decoder


Pass = tuple[OfflineRun, list[list[int]]]  # one pass's timed figures and every prompt's output tokens


def offline_summary(runs: Sequence[OfflineRun], weight_bytes: int) -> dict:
    """Repeats of one (decoder, batch size): median tokens/s and weight bandwidth, and over all repeats a request's
    target forwards per output token (1.0 for autoregressive decoding at any batch size) and the acceptance.
    Weight bandwidth = weight bytes x target forwards/s (each forward streams all weights once)."""
    tokens = sum(r.output_tokens for r in runs)
    forwards = sum(r.request_forwards for r in runs)
    accepted = [r.accepted_tokens for r in runs]
    drafts = [r.num_drafts for r in runs]
    draft_tokens = [r.draft_tokens for r in runs]
    costs = [r.drafting_cost for r in runs]
    return {
        "tokens_per_s": statistics.median(r.output_tokens / r.elapsed for r in runs),
        "runs_tokens_per_s": [r.output_tokens / r.elapsed for r in runs],
        "output_tokens": tokens // len(runs),
        "target_forwards_per_token": forwards / tokens if tokens else None,
        "mean_acceptance_length": (
            None if None in accepted or None in drafts else mean_acceptance_length(sum(accepted), sum(drafts))
        ),
        "nodes_per_draft": (
            None if None in draft_tokens or None in drafts or not sum(drafts) else sum(draft_tokens) / sum(drafts)
        ),
        "weight_GB_s": statistics.median(weight_bytes * r.target_forwards / r.elapsed for r in runs) / 1e9,
        "drafting_cost": (None if None in costs else statistics.median(costs)),
        "runs_drafting_cost": costs,
    }


def speedup(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else value / baseline
