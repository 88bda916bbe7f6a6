"""Engine configuration: one dataclass per concern, shared by `leapserve serve` and `LLM(...)`."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # None: the model's own limit
    trust_remote_code: bool = False
    served_model_name: str | None = None  # what /v1/models lists; defaults to `model`


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: a memory fraction on GPU, 64k tokens (capped by RAM) on CPU
    gpu_memory_utilization: float = 0.85


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048  # prompt tokens processed per step (longer prompts are chunked)
    max_waiting_requests: int = 1024  # beyond this, new requests are refused (HTTP 503)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    decoder: str = "autoregressive"
    speculative_config: dict | None = None
    seed: int = 0
