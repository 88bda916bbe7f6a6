"""The drafter protocol: proposal sources for the speculative decoder, and their candidate trees.

Concrete drafters live in `leapserve.drafters` (which depends on this package, not the other way round); the
decoder finds them by method name through `make_drafter`, importing `leapserve.drafters` only then.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .config import SpeculativeConfig

if TYPE_CHECKING:
    from .runner import ModelRunner
    from .sampler import Sampler
    from .scheduler import ScheduledSeq

# method -> "module:class" in leapserve.drafters
DRAFTERS = {"ngram": "leapserve.drafters.ngram:NgramDrafter",
            "draft_model": "leapserve.drafters.draft_model:DraftModelDrafter",
            "fspad": "leapserve.drafters.fspad:FSPADDrafter"}


@dataclass
class DraftTree:
    """Candidate tokens for one sequence. Index 0 is the root (the last committed token); node i >= 1 is
    `tokens[i - 1]`, child of `parents[i - 1]` (< i, so parents come first)."""
    tokens: list[int]
    parents: list[int]
    q: list[torch.Tensor | None]  # per node: the distribution it was drawn from; None = chosen deterministically

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], q: list[torch.Tensor | None] | None = None) -> DraftTree:
        return cls(list(tokens), list(range(len(tokens))), q or [None] * len(tokens))

    def truncated(self, n: int) -> DraftTree:
        """The first n nodes (still a tree: parents precede children)."""
        return DraftTree(self.tokens[:n], self.parents[:n], self.q[:n])


@dataclass
class TreeShape:
    """How a model drafter grows its tree: static branching per depth (a chain is [1] * k), or an EAGLE-2
    dynamic tree (`depth` levels, `top_k` frontier and children, the best `total_tokens` by cumulative log q)."""
    branching: list[int] | None = None
    depth: int = 0
    top_k: int = 0
    total_tokens: int = 0

    @classmethod
    def from_config(cls, spec: SpeculativeConfig) -> TreeShape:
        if spec.tree is None:
            return cls(branching=[1] * spec.num_speculative_tokens)
        if isinstance(spec.tree, list):
            return cls(branching=list(spec.tree))
        t = {"depth": 5, "top_k": 4, "total_tokens": 16, **spec.tree}
        return cls(depth=t["depth"], top_k=t["top_k"], total_tokens=t["total_tokens"])

    @property
    def is_chain(self) -> bool:
        return self.branching is not None and all(b == 1 for b in self.branching)

    @property
    def num_levels(self) -> int:
        return len(self.branching) if self.branching is not None else self.depth

    @property
    def max_nodes(self) -> int:
        if self.branching is None:
            return self.total_tokens
        return sum(math.prod(self.branching[:d + 1]) for d in range(len(self.branching)))

    @property
    def max_expanded(self) -> int:
        """Nodes a model drafter runs through itself (all but the last level's) in one proposal."""
        if self.branching is None:
            return self.top_k * (self.depth - 1)
        return sum(math.prod(self.branching[:d + 1]) for d in range(len(self.branching) - 1))


class Drafter(Protocol):
    lookahead: int  # cache slots past a sequence's committed tokens that `propose` may write (>= max_nodes)
    max_nodes: int  # the most candidates it proposes for one sequence
    max_depth: int  # the longest root-to-leaf path it proposes

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        """One tree per scheduled sequence with at most `budgets[i]` nodes (0: an empty tree). Every scheduled
        sequence is passed, so a drafter with its own cache can follow prefill chunks and preemptions."""
        ...


def make_drafter(spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler) -> Drafter:
    """The drafter for `spec.method`, given the target's runner (cache geometry, device) and sampler (RNG)."""
    module, name = DRAFTERS[spec.method].split(":")
    return getattr(importlib.import_module(module), name)(spec, runner, sampler)
