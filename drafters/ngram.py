"""Prompt lookup (n-gram) drafting: no weights; the continuation of the latest earlier occurrence of the
sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) is proposed as a chain."""

from __future__ import annotations

import torch

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.observe import ForwardHook
from leapserve.decoding.prompt_lookup import NgramIndex
from leapserve.decoding.request import PerSequence, Sequence
from leapserve.decoding.runner import ModelRunner
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.scheduler import ScheduledSeq


class NgramDrafter:
    needs_target_features = False

    def __init__(
        self, spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler, *, on_forward: ForwardHook | None = None
    ):
        """No model, so `on_forward` is never called."""
        self.n_min, self.n_max = spec.prompt_lookup_min, spec.prompt_lookup_max
        self.max_nodes = self.max_depth = self.lookahead = spec.num_speculative_tokens
        self._index = PerSequence(lambda: NgramIndex(self.n_min, self.n_max))

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        return [
            DraftTree.chain(self._index[s.seq].lookup(s.seq.token_ids, k) if k else [])
            for s, k in zip(scheduled, budgets)
        ]

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """Reads no target features."""
