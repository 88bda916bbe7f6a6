"""Masked diffusion decoding: the settings (`--diffusion-config`, per request `diffusion_*` extra arguments) and the
rules that pick which masked positions of the current block a step commits.

| rule | commits per step | from |
|---|---|---|
| `entropy` | the lowest-entropy masked position, and every other one with entropy <= `threshold` | dParallel |
| `confidence` | LLaDA's schedule: `steps` spread evenly over the blocks, the most probable positions first | LLaDA |
| `fixed` | the `k` most probable positions | few-step baseline |

Tokens are the argmax of the logits (with Gumbel noise when the temperature is above 0, as LLaDA samples);
entropies and probabilities in float64. A committed token is never remasked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from .errors import InvalidRequestError

RULES = ("entropy", "confidence", "fixed")
CACHES = ("none", "prefix", "dual")
EXTRA_ARG_PREFIX = "diffusion_"  # per request: SamplingParams.extra_args["diffusion_threshold"] etc.


@dataclass(frozen=True)
class DiffusionConfig:
    """How a masked diffusion LM decodes (`--diffusion-config` JSON; a request overrides any key as `diffusion_<key>`).

    `gen_length` tokens after the prompt start masked (the canvas) and are decoded left to right in blocks of
    `block_length`; `max_tokens` cuts the output (and the decoding) short. `cache`: `none` runs every step over the
    whole sequence (exact), `prefix` and `dual` reuse K/V computed at the block's first step (Fast-dLLM's
    approximations): `prefix` for the tokens before the block, `dual` also for the masked ones after it.
    """

    gen_length: int = 256
    block_length: int = 32
    rule: str = "entropy"
    threshold: float = 0.5  # entropy, in nats
    steps: int | None = None  # confidence: steps over the whole canvas; default gen_length (one token per step)
    k: int = 2  # fixed: tokens per step
    cache: str = "none"

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise InvalidRequestError(f"diffusion config: {key} {msg}", EXTRA_ARG_PREFIX + key)

        for key in ("gen_length", "block_length", "k"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, "must be an integer >= 1")
        check(self.gen_length % self.block_length == 0, "gen_length", "must be a multiple of block_length")
        check(self.rule in RULES, "rule", f"must be one of {RULES}, got {self.rule!r}")
        check(self.cache in CACHES, "cache", f"must be one of {CACHES}, got {self.cache!r}")
        check(
            isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool) and self.threshold >= 0,
            "threshold",
            "must be a number >= 0",
        )
        if self.steps is not None:
            blocks = self.gen_length // self.block_length
            check(
                isinstance(self.steps, int) and blocks <= self.steps <= self.gen_length and self.steps % blocks == 0,
                "steps",
                f"must be a multiple of the number of blocks ({blocks}) and at most gen_length",
            )

    @classmethod
    def from_dict(cls, d: dict | None) -> DiffusionConfig:
        d = d or {}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"diffusion_config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def for_request(self, extra_args: dict | None) -> DiffusionConfig:
        """This config with the request's `diffusion_<key>` extra arguments applied (other extra arguments are
        left to whoever reads them)."""
        overrides = {
            k.removeprefix(EXTRA_ARG_PREFIX): v for k, v in (extra_args or {}).items() if k.startswith(EXTRA_ARG_PREFIX)
        }
        known = {f.name for f in fields(self)}
        for key in overrides:
            if key not in known:
                raise InvalidRequestError(
                    f"unknown diffusion argument {EXTRA_ARG_PREFIX + key!r}; known: "
                    + ", ".join(EXTRA_ARG_PREFIX + k for k in sorted(known)),
                    EXTRA_ARG_PREFIX + key,
                )
        return replace(self, **overrides) if overrides else self

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def as_dict(self) -> dict:
        return asdict(self)


def transfer_counts(num_masked: int, steps: int) -> list[int]:
    """LLaDA's schedule: `num_masked` tokens committed over `steps` steps, as evenly as possible, earlier steps
    taking the remainder."""
    base, extra = divmod(num_masked, steps)
    return [base + (i < extra) for i in range(steps)]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Tokens `[N]` from logits `[N, V]`: the argmax, or with temperature > 0 LLaDA's Gumbel-max sampling in float64
    (exp(logits) / (-log u) ** temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def choose(
    rule: str, logits: torch.Tensor, tokens: torch.Tensor, *, threshold: float = 0.0, count: int = 1
) -> torch.Tensor:
    """Which of a block's masked positions to commit this step: indices into `logits` `[N, V]` (N >= 1 masked
    positions, in position order) whose chosen `tokens` `[N]` are committed; never empty. `entropy` uses
    `threshold`; `confidence` and `fixed` commit the `count` most probable chosen tokens."""
    probs = torch.softmax(logits.double(), dim=-1)  # [N, V]
    if rule == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)  # [N]
        order = torch.argsort(entropy, stable=True)
        keep = entropy[order] <= threshold
        keep[0] = True  # at least one token per step
        return order[keep]
    confidence = probs.gather(-1, tokens[:, None])[:, 0]  # [N]
    return torch.topk(confidence, min(max(count, 1), len(confidence))).indices
