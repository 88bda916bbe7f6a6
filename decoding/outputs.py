"""What the engine returns per request, shaped like vLLM's `RequestOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: sampled token + top-k

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    target_forwards: int = 0  # target-model forwards this request took part in (decode steps)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    num_drafts: int = 0  # verifications with at least one draft token
    denoising_steps: int = 0  # diffusion decoding steps (dparallel); 0 for other decoders
    # model forwards the request took part in, prefill chunks and jacobi passes included (silent-thought); 0 for
    # other decoders
    sequential_forwards: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: verifications that accepted draft i + 1

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens committed per target forward (1.0 for autoregressive decoding)."""
        if self.target_forwards == 0:
            return None
        return (self.accepted_tokens + self.target_forwards) / self.target_forwards


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # as SamplingParams.prompt_logprobs asked
