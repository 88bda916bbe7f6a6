"""The decoder interface: one engine step over the sequences the scheduler picked.

A decoder turns scheduled sequences into `SeqChunk`s for the model runner and decides which tokens to commit.
The shape admits every decoder of the design: several tokens committed per step (speculative), draft trees
(`SeqChunk.positions` and `tree_mask`), bidirectional blocks for diffusion models (an all-true `tree_mask`),
and extra inputs such as silent-thought embeddings (`SeqChunk.extra`). `lookahead` cache slots per sequence
are reserved by the scheduler for tokens a decoder writes beyond the committed ones (drafts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..observe import Observers
from ..outputs import Logprob
from ..request import Request, Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sample, Sampler, SequenceError
from ..sampling_params import SamplingParams
from ..scheduler import ScheduledSeq


@dataclass
class SeqStep:
    """What one step did for one sequence."""

    samples: list[Sample] = field(default_factory=list)  # committed tokens, in order
    error: SequenceError | None = None
    forwarded: bool = False  # took part in a target forward that produced tokens
    draft_tokens: int = 0
    accepted_tokens: int = 0
    masked_slots: int = 0  # cache slots to leave as a hole after the committed tokens (the padded layout)
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # the request's next prompt tokens'
    denoising_steps: int = 0  # diffusion steps taken (a step may commit no token)
    finished: bool = False  # the decoder has nothing more to give (a diffusion canvas fully handed over): "length"
    sequential_forwards: int = 0  # model forwards the sequence took part in (decoders that count them)


class Decoder(ABC):
    name: str
    lookahead: int = 0  # cache slots reserved per sequence beyond this step's tokens
    model_impl: str | None = None  # the model implementation the decoder needs (ModelConfig.model_impl); None: any

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig, observers: Observers):
        self.runner = runner
        self.sampler = sampler
        self.config = config
        self.observers = observers  # the engine's clock, and where drafters report their forwards

    def slots_ahead(self, seq: Sequence) -> int:
        """Cache slots to reserve for `seq` past its tokens (at most `lookahead`)."""
        return self.lookahead

    def expand_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt the request runs with (its `prompt_token_ids` from then on); InvalidRequestError if `params`
        do not allow one. Decoders that insert nothing return it unchanged."""
        return prompt_ids

    def validate(self, prompt_len: int, params: SamplingParams, max_model_len: int) -> None:
        """Raise InvalidRequestError if this decoder cannot serve a request with these parameters (all can, here)."""
        return None

    @abstractmethod
    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        """Run one step; K/V of committed tokens must be in the cache when it returns (`num_computed` is the
        engine's to advance: it adds the computed prompt chunk and all committed tokens but the last, then
        `masked_slots` holes)."""

    def sample_rows(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> dict[Sequence, SeqStep]:
        """One token for each sequence that completes its prefix, from its row of `logits` (those sequences' rows,
        in order), sampled in one batch; the others' steps empty."""
        sampling = [s.seq for s in scheduled if s.completes_prefix]
        results = {s.seq: SeqStep() for s in scheduled}
        for seq, sample in zip(sampling, self.sampler.sample(logits, sampling)):
            if isinstance(sample, SequenceError):
                results[seq].error = sample
            else:
                results[seq] = SeqStep(samples=[sample], forwarded=True)
        return results

    def score_prompts(
        self,
        scheduled: list[ScheduledSeq],
        chunks: list[SeqChunk],
        hidden: torch.Tensor,
        results: dict[Sequence, SeqStep],
    ) -> None:
        """Prompt logprobs for the requests that ask for them (`SamplingParams.prompt_logprobs`): the row of prompt
        position p in `hidden` `[T, d]` (the step's packed chunks, in order) scores prompt token p + 1. A request's
        prompt is scored once, in order: a recomputed (preempted) sequence, or a request's other samples, score only
        positions past what is scored."""
        lo, frontier = 0, dict[Request, int]()  # request -> the first position not yet scored
        for s, chunk in zip(scheduled, chunks):
            seq, row = s.seq, lo
            lo += len(chunk.token_ids)
            req, k = seq.request, seq.params.prompt_logprobs
            if req.prompt_logprobs is None or k is None:
                continue
            first = frontier.get(req, len(req.prompt_logprobs) - 1)
            end = min(seq.num_computed + s.num_new, seq.prompt_len - 1)  # the last prompt token scores the output
            if not seq.num_computed <= first < end:
                continue
            frontier[req] = end
            rows = hidden[row + first - seq.num_computed : row + end - seq.num_computed]
            results[seq].prompt_logprobs = [
                self.sampler.token_logprobs(raw, token, k)
                for raw, token in zip(self.runner.logits(rows), seq.token_ids[first + 1 : end + 1])
            ]
