"""Per-request sampling parameters, shaped like vLLM's `SamplingParams`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .structured_output import StructuredOutputsParams

# (prompt_token_ids, output_token_ids, logits [V]) -> logits; applied before temperature and truncation
LogitsProcessor = Callable[[list[int], list[int], torch.Tensor], torch.Tensor]
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 64  # stop strings a request may give: each is looked for in every new piece of text


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob (after the first) plus the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and the output (as transformers)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_p: float = 0.0  # sampling keeps tokens at least this share of the most likely one's probability
    min_tokens: int = 0  # before this many tokens, EOS, stop_token_ids and stop strings do not end the sequence
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None  # a JSON schema, regex, choice or grammar to follow
    extra_args: dict | None = None  # decoder-specific arguments (vLLM's name), e.g. {"diffusion_threshold": 0.3}

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def processes_logits(self) -> bool:
        """Whether logits change before sampling beyond temperature and truncation (penalties, processors)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.logits_processors
            or self.structured_outputs is not None
        )

    def validate(self) -> None:
        def bad(cond: bool, param: str, msg: str) -> None:
            if cond:
                raise InvalidRequestError(msg, param)

        bad(not 1 <= self.n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {self.n}")
        bad(
            self.seed is not None and not -(2**63) <= self.seed < 2**63,
            "seed",
            f"seed must be a 64-bit signed integer, got {self.seed}",
        )
        bad(
            self.max_tokens is not None and self.max_tokens < 1,
            "max_tokens",
            f"max_tokens must be at least 1, got {self.max_tokens}",
        )
        bad(
            not 0.0 <= self.temperature <= 2.0,
            "temperature",
            f"temperature must be between 0 and 2, got {self.temperature}",
        )
        bad(not 0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        bad(self.top_k < 0, "top_k", f"top_k must be -1 (off) or at least 1, got {self.top_k}")
        bad(
            not -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"presence_penalty must be between -2 and 2, got {self.presence_penalty}",
        )
        bad(
            not -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}",
        )
        bad(
            self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}",
        )
        bad(
            self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
            "prompt_logprobs",
            f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}",
        )
        bad(
            not 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
        )
        bad(not 0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be between 0 and 1, got {self.min_p}")
        bad(
            self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens),
            "min_tokens",
            f"min_tokens must be between 0 and max_tokens, got {self.min_tokens}",
        )
        bad(
            any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()),
            "logit_bias",
            "logit_bias values must be between -100 and 100",
        )
        bad(any(not s for s in self.stop), "stop", "stop strings must not be empty")
        bad(len(self.stop) > MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(self.stop)}")
