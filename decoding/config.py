"""Engine configuration: one dataclass per concern, shared by `leapserve serve` and `LLM(...)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import option
from .drafter_methods import drafter_method

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
MODEL_IMPLS = ("auto", "leapserve", "transformers")

# A model's own drafter, used when neither --decoder nor --speculative-config is given: model alias -> shipped
# drafter (a checkpoint name, `model_loader.shipped_checkpoints`).
DEFAULT_DRAFTERS = {DEFAULT_MODEL: "smollm2-135m-instruct-fspad"}
# Its EAGLE-2 tree per device type: a drafter forward and a verified node cost more on a CPU (BENCHMARKS.md, "Trees
# sized for the CPU"; docs/speculative-config.md).
DEFAULT_TREES = {
    "cpu": {"depth": 4, "top_k": 4, "total_tokens": 8},
    "cuda": {"depth": 5, "top_k": 8, "total_tokens": 24},
}
# A prompt-lookup chain merged into each tree (`prompt_lookup.PromptLookup`; BENCHMARKS.md, "A prompt-lookup chain in
# the drafter's trees").
DEFAULT_LOOKUP = {"tokens": 8}


def default_speculative_config(model: str, device_type: str) -> dict | None:
    """The speculative config `model` is served with by default on `device_type`, or None (plain decoding)."""
    drafter = DEFAULT_DRAFTERS.get(model.lower())
    if drafter is None:
        return None
    return {
        "method": "fspad",
        "model": drafter,
        "tree": dict(DEFAULT_TREES[device_type]),
        "lookup": dict(DEFAULT_LOOKUP),
    }


@dataclass
class ModelConfig:
    model: str = option(DEFAULT_MODEL, "alias, local checkpoint directory, .gguf file or hub id")
    dtype: str = option("auto", "auto: float32 on CPU, bfloat16 on CUDA", choices=DTYPES)
    device: str = option("auto", "where the model runs", choices=DEVICES)
    max_model_len: int | None = option(None, "context length (prompt + completion); default: the model's")
    trust_remote_code: bool = option(False, "allow a checkpoint's own modeling code")
    served_model_name: str | None = option(None, "the name clients send as `model`; default: --model")
    model_impl: str = option(
        "auto",
        "auto: leapserve's own Llama-family decoder (fused, prepacked GEMMs) where it covers the architecture, else "
        "transformers' modules; transformers: always transformers' modules (logits equal to transformers' generate)",
        choices=MODEL_IMPLS,
    )
    enforce_eager: bool = option(
        False, "never torch.compile the model (only leapserve's Llama is compiled; transformers' modules run eagerly)"
    )


@dataclass
class CacheConfig:
    block_size: int = option(16, "tokens per KV cache block")
    kv_cache_tokens: int | None = option(
        None, "KV cache capacity in tokens; default: a memory fraction on GPU, 32k tokens (capped by RAM) on CPU"
    )
    gpu_memory_utilization: float = option(0.85, "share of the free GPU memory the KV cache takes")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = option(32, "sequences decoded per step")
    max_num_batched_tokens: int = option(2048, "prompt tokens processed per step (longer prompts are chunked)")
    max_waiting_requests: int = option(1024, "beyond this many waiting requests, new ones get HTTP 503")


SPEC_LAYOUTS = ("packed", "padded")
LOOKUP_DEFAULTS = {"ngram_min": 2, "ngram_max": 4}  # `SpeculativeConfig.lookup`: matches of one token mislead


@dataclass
class SpeculativeConfig:
    """`--speculative-config`, spelled as vLLM spells it.

    `tree`: None (a chain of `num_speculative_tokens`), a list of branching factors per depth (a static tree,
    e.g. [3, 2, 1]), or {"depth", "top_k", "total_tokens"} (an EAGLE-2 dynamic tree; draft_model and fspad).
    `lookup`: None, or {"tokens", "ngram_min", "ngram_max"}: a prompt-lookup chain of up to `tokens` tokens merged
    into each tree of another method (`prompt_lookup.PromptLookup`; n-grams of 2 to 4 tokens unless given).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    tree: list[int] | dict | None = None
    layout: str = "packed"
    adaptive: bool = True
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    max_batch_draft_tokens: int = 64  # adaptive: draft tokens per step over the whole batch
    dtype: str = "auto"  # fspad: its weights and cache (`drafters.fspad.draft_dtype`)
    lookup: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SpeculativeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(known)}")

        drafter_method(d.get("method"))  # an unknown method before what depends on it
        k = d.get("num_speculative_tokens")
        if d.get("tree") is None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64):
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in [1, 64], got {k!r}")
        cfg = cls(**{**d, "num_speculative_tokens": k or 0})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"speculative_config: {msg}")

        method = drafter_method(self.method)
        check(not method.needs_model or bool(self.model), f'method "{self.method}" needs "model" (a checkpoint)')
        check(self.layout in SPEC_LAYOUTS, f"layout must be one of {SPEC_LAYOUTS}, got {self.layout!r}")
        check(1 <= self.prompt_lookup_min <= self.prompt_lookup_max, "need 1 <= prompt_lookup_min <= prompt_lookup_max")
        check(self.max_batch_draft_tokens >= 1, "max_batch_draft_tokens must be at least 1")
        check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(self.dtype == "auto" or self.method == "fspad", "dtype is the fspad drafter's; others run the target's")
        if isinstance(self.tree, list):
            check(
                len(self.tree) > 0 and all(isinstance(b, int) and b >= 1 for b in self.tree),
                f"a static tree is a non-empty list of branching factors >= 1, got {self.tree!r}",
            )
        elif isinstance(self.tree, dict):
            check(
                set(self.tree) <= {"depth", "top_k", "total_tokens"}
                and all(isinstance(v, int) and v >= 1 for v in self.tree.values()),
                f'a dynamic tree is {{"depth", "top_k", "total_tokens"}} (integers >= 1), got {self.tree!r}',
            )
        else:
            check(self.tree is None, f"tree must be null, a list or an object, got {self.tree!r}")
        check(
            method.trees or self.tree is None or all(b == 1 for b in self.tree),
            f"the {self.method} drafter proposes chains only, no static or dynamic trees",
        )
        if self.lookup is not None:
            lookup = self.lookup_settings()
            check(self.method != "ngram", "lookup puts a prompt-lookup chain into the trees of another method")
            check(
                set(self.lookup) <= set(LOOKUP_DEFAULTS) | {"tokens"}
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in lookup.values())
                and lookup["ngram_min"] <= lookup["ngram_max"],
                'lookup is {"tokens", "ngram_min", "ngram_max"} (integers >= 1, tokens required, ngram_min <= '
                f"ngram_max), got {self.lookup!r}",
            )

    def lookup_settings(self) -> dict:
        """`lookup` with its defaults filled in (`lookup` given)."""
        if not isinstance(self.lookup, dict):
            raise ValueError(f'speculative_config: lookup is an object such as {{"tokens": 8}}, got {self.lookup!r}')
        return {"tokens": None, **LOOKUP_DEFAULTS, **self.lookup}


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    decoder: str | None = option(
        None,
        "default: speculative when --speculative-config is given or the model has a shipped drafter (the default "
        "model has), else the model's own (dparallel, silent-thought) or autoregressive",
    )
    speculative_config: dict | None = option(
        None,
        'JSON object, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'; default: the model\'s shipped '
        "drafter, if any (docs/speculative-config.md)",
    )
    diffusion_config: dict | None = option(
        None,
        'dparallel decoder: JSON object, e.g. \'{"gen_length": 256, "block_length": 32, "rule": "entropy", '
        '"threshold": 0.5, "cache": "none"}\' (docs/diffusion-models.md)',
    )
    seed: int = option(0, "seed of the engine's sampling generator")
    default_max_tokens: int = option(
        1024,
        "completion budget of a request that sets no max_tokens (a chat completion may leave it out), so that no "
        "request holds a CPU server for minutes unasked; 0: up to the context length",
    )

    def __post_init__(self) -> None:
        if self.default_max_tokens < 0:
            raise ValueError(f"default_max_tokens must be 0 (off) or positive, got {self.default_max_tokens}")
