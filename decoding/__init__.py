"""leapserve.decoding: the engine (model loading, paged KV cache, runner, scheduler, sampling, decoders) and the
offline API."""

from .host_memory import request_huge_pages
from .paths import point_inductor_at_cache

point_inductor_at_cache()  # before the imports below, one of which makes inductor fix its cache directory
request_huge_pages()  # before torch's first CPU allocation

from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from .llm import LLM  # noqa: E402
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402

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
