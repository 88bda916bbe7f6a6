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

from ..config import EngineConfig
from ..observe import Observers
from ..request import Sequence
from ..runner import ModelRunner
from ..sampler import Sample, Sampler, SequenceError
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


class Decoder(ABC):
    name: str
    lookahead: int = 0  # cache slots reserved per sequence beyond this step's tokens

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig, observers: Observers):
        self.runner = runner
        self.sampler = sampler
        self.config = config
        self.observers = observers  # the engine's clock, and where drafters report their forwards

    @abstractmethod
    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        """Run one step; K/V of committed tokens must be in the cache when it returns (`num_computed` is the
        engine's to advance: it adds the computed prompt chunk and all committed tokens but the last, then
        `masked_slots` holes)."""
