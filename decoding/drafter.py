"""The drafter protocol (proposal sources for the speculative decoder), their candidate trees, and `make_drafter`.

Concrete drafters live in `leapserve.drafters` (which depends on this package, not the other way round); the
registry (`drafter_methods.py`) names them as "module:Class", imported only when `make_drafter` first builds one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .config import SpeculativeConfig
from .drafter_methods import drafter_method
from .observe import ForwardHook

if TYPE_CHECKING:
    from .request import Sequence
    from .runner import ModelRunner
    from .sampler import Sampler
    from .scheduler import ScheduledSeq


@dataclass
class DraftTree:
    """Candidate tokens for one sequence. Index 0 is the root (the last committed token); node i >= 1 is
    `tokens[i - 1]`, child of `parents[i - 1]` (< i, so parents come first). Nodes come in the drafter's order of
    confidence: the first n are the tree it would propose with a budget of n."""

    tokens: list[int]
    parents: list[int]
    q: list[torch.Tensor | None]  # per node: the distribution it was drawn from; None = chosen deterministically
    scores: list[float] | None = None  # per node: the drafter's confidence (cumulative log q), where it gives one

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], q: list[torch.Tensor | None] | None = None) -> DraftTree:
        return cls(list(tokens), list(range(len(tokens))), q or [None] * len(tokens))

    def truncated(self, n: int) -> DraftTree:
        """The first n nodes: the drafter's best n (still a tree: parents precede children)."""
        return DraftTree(
            self.tokens[:n], self.parents[:n], self.q[:n], None if self.scores is None else self.scores[:n]
        )


class Drafter(Protocol):
    """Built as `Drafter(spec, runner, sampler, on_forward=...)`; a drafter with a model calls `on_forward` with
    the token count of each of its forwards, before it runs."""

    lookahead: int  # cache slots past a sequence's committed tokens that `propose` may write (>= max_nodes)
    max_nodes: int  # the most candidates it proposes for one sequence
    max_depth: int  # the longest root-to-leaf path it proposes
    needs_target_features: bool  # wants `observe` called with the target's features

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        """One tree per scheduled sequence with at most `budgets[i]` nodes (0: an empty tree). Every scheduled
        sequence is passed, so a drafter with its own cache can follow prefill chunks and preemptions."""
        ...

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """The target's final-norm features `[n, d]` of `seq`'s committed positions `start, start + 1, ...`, in
        order; called only when `needs_target_features` (a no-op for the others)."""
        ...


def make_drafter(
    spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler, on_forward: ForwardHook | None = None
) -> Drafter:
    """The drafter for `spec.method`, given the target's runner (cache geometry, device) and sampler (RNG);
    `on_forward(num_tokens)` is told of each forward of the drafter's model."""
    method = drafter_method(spec.method)
    factory = method.factory
    if isinstance(factory, str):
        module, name = factory.split(":")
        factory = getattr(importlib.import_module(module), name)
    drafter = factory(spec, runner, sampler, on_forward=on_forward)
    if drafter.needs_target_features != method.target_features:
        raise TypeError(
            f"drafter method {method.name!r} declares target_features={method.target_features}, "
            f"its drafter needs_target_features={drafter.needs_target_features}"
        )
    return drafter
