"""leapserve.decoding: the engine (model loading, paged KV cache, runner, scheduler, sampling, decoders) and the
offline API."""

from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "EngineConfig",
    "ModelConfig",
    "CacheConfig",
    "SchedulerConfig",
]
