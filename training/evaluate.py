"""Acceptance of a drafter on held-out prompts: the engine decodes greedily with the target and the drafter over chat
prompts of the `test` split of `leapserve.prompts` (which training data never uses), and counts what it accepted."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from leapserve.decoding.llm import LLM
from leapserve.decoding.outputs import RequestOutput
from leapserve.decoding.sampling_params import SamplingParams
from leapserve.prompts import load


@dataclass
class Acceptance:
    num_prompts: int
    output_tokens: int
    target_forwards: int
    num_drafts: int  # verifications that had at least one draft token
    draft_tokens: int
    accepted_tokens: int
    seconds: float
    baseline_tokens_per_s: float | None = None  # autoregressive decoding of the same prompts, same machine

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per target forward, the bonus token included (tau)."""
        return (self.accepted_tokens + self.target_forwards) / max(self.target_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (alpha)."""
        return self.accepted_tokens / max(self.draft_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        speedup = (
            {"speedup": round(self.tokens_per_s / self.baseline_tokens_per_s, 3)} if self.baseline_tokens_per_s else {}
        )
        return {
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            **speedup,
            **asdict(self),
        }


def _decode(llm: LLM, conversations: list[list[dict]], max_tokens: int) -> tuple[list[RequestOutput], float]:
    """Greedy outputs and wall time, after a short warm-up."""
    llm.chat(conversations[0], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return outs, time.perf_counter() - start


def evaluate_acceptance(
    target: str,
    speculative_config: dict,
    *,
    prompts: str = "mixed",
    num_prompts: int = 32,
    max_tokens: int = 128,
    max_num_seqs: int = 8,
    baseline: bool = False,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> Acceptance:
    """Greedy speculative decoding of `num_prompts` test prompts of the set `prompts` (or a .jsonl file), in
    batches of up to `max_num_seqs`; with `baseline`, autoregressive decoding of the same prompts too, for the
    speedup."""
    conversations = [
        [{"role": "user", "content": p}] if isinstance(p, str) else p for p in load(prompts, "test", num_prompts, seed)
    ]
    if not conversations:
        raise ValueError(f"no test prompts in {prompts!r}")
    common = {"device": device, "dtype": dtype, "max_num_seqs": max_num_seqs, "seed": seed}
    outs, seconds = _decode(LLM(target, speculative_config=speculative_config, **common), conversations, max_tokens)
    baseline_tokens_per_s = None
    if baseline:
        plain, plain_seconds = _decode(LLM(target, decoder="autoregressive", **common), conversations, max_tokens)
        baseline_tokens_per_s = sum(len(o.outputs[0].token_ids) for o in plain) / plain_seconds
    metrics = [o.metrics for o in outs]
    return Acceptance(
        num_prompts=len(outs),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        target_forwards=sum(m.target_forwards for m in metrics),
        num_drafts=sum(m.num_drafts for m in metrics),
        draft_tokens=sum(m.draft_tokens for m in metrics),
        accepted_tokens=sum(m.accepted_tokens for m in metrics),
        seconds=seconds,
        baseline_tokens_per_s=baseline_tokens_per_s,
    )
