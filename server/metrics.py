"""Prometheus metrics, named `leapserve:*` like vLLM's `vllm:*`, on the server's own registry.

Per-request counters and latency histograms are fed by a `RequestObserver` per engine request; engine state
(running / waiting requests, KV cache usage, preemptions) is read from `engine.stats()` at scrape time.
Counters derived from `RequestMetrics` at the end of a request (e.g. speculative-decoding draft / accepted
tokens) belong in `RequestObserver._finish`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from leapserve.decoding.async_engine import AsyncLLMEngine
from leapserve.decoding.outputs import RequestOutput

PREFIX = "leapserve:"
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class EngineStatsCollector(Collector):
    """Reads the engine's scheduler and cache state whenever /metrics is scraped."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats()
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running", "Requests in the running batch.", value=stats.num_running
        )
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", value=stats.num_waiting
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", value=stats.kv_cache_usage
        )
        yield CounterMetricFamily(
            PREFIX + "num_preemptions", "Requests preempted to free KV blocks.", value=stats.num_preemptions
        )


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.request_success = Counter(
            PREFIX + "request_success", "Finished sequences, by finish reason.", ["finished_reason"], registry=reg
        )
        self.request_failure = Counter(PREFIX + "request_failure", "Requests the engine failed.", registry=reg)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=reg)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive outputs of a request.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from arrival to the end of the request.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.spec_num_drafts = Counter(
            PREFIX + "spec_decode_num_drafts", "Speculative verifications with drafts.", registry=reg
        )
        self.spec_num_draft_tokens = Counter(
            PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed.", registry=reg
        )
        self.spec_num_accepted_tokens = Counter(
            PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=reg
        )
        self.spec_num_accepted_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0 = first).",
            ["position"],
            registry=reg,
        )
        # vLLM's names for its diffusion counters
        self.diffusion_num_denoising_steps = Counter(
            PREFIX + "diffusion_num_denoising_steps", "Diffusion decoding steps (model forwards).", registry=reg
        )
        self.diffusion_num_committed_tokens = Counter(
            PREFIX + "diffusion_num_committed_tokens", "Tokens committed by diffusion decoding.", registry=reg
        )
        reg.register(EngineStatsCollector(engine))

    def observer(self) -> RequestObserver:
        return RequestObserver(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """Follows one engine request's cumulative outputs and records its metrics."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.num_tokens = 0
        self.last_token_time: float | None = None

    def on_output(self, output: RequestOutput) -> None:
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        if num_tokens > self.num_tokens:
            now = time.perf_counter()
            if self.last_token_time is not None:
                self.metrics.inter_token_latency.observe(now - self.last_token_time)
            self.last_token_time = now
            self.num_tokens = num_tokens
        if output.finished:
            self._finish(output)

    def on_abort(self, num_sequences: int) -> None:
        self.metrics.request_success.labels(finished_reason="abort").inc(num_sequences)

    def on_failure(self) -> None:
        self.metrics.request_failure.inc()

    def _finish(self, output: RequestOutput) -> None:
        m = self.metrics
        for completion in output.outputs:
            m.request_success.labels(finished_reason=completion.finish_reason or "unknown").inc()
        m.prompt_tokens.inc(len(output.prompt_token_ids))
        m.generation_tokens.inc(self.num_tokens)
        timing = output.metrics
        if timing is not None and timing.first_token_time is not None:
            m.time_to_first_token.observe(timing.first_token_time - timing.arrival_time)
        if timing is not None and timing.latency is not None:
            m.e2e_request_latency.observe(timing.latency)
        if timing is not None and timing.denoising_steps:
            m.diffusion_num_denoising_steps.inc(timing.denoising_steps)
            m.diffusion_num_committed_tokens.inc(self.num_tokens)
        if timing is not None and timing.num_drafts:
            m.spec_num_drafts.inc(timing.num_drafts)
            m.spec_num_draft_tokens.inc(timing.draft_tokens)
            m.spec_num_accepted_tokens.inc(timing.accepted_tokens)
            for position, count in enumerate(timing.accepted_per_position):
                m.spec_num_accepted_per_pos.labels(position=str(position)).inc(count)
