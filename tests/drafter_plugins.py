"""A drafter plugin for tests: a draft model whose proposals a test rewrites, registered through the drafter
registry like any other method, so tests steer drafting without patching the product."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable

import torch

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree, make_drafter
from leapserve.decoding.drafter_methods import DrafterMethod, register_drafter

Tamper = Callable[[list, list[int], list[DraftTree]], list[DraftTree]]


class TamperedDrafter:
    """A draft model drafter whose proposals pass through `tamper(scheduled, budgets, trees)`: a drafter plugin,
    registered and configured as any other method (`tampered_method`)."""

    needs_target_features = False

    def __init__(self, tamper: Tamper, spec: SpeculativeConfig, runner, sampler, on_forward=None):
        self.tamper = tamper
        self.inner = make_drafter(dataclasses.replace(spec, method="draft_model"), runner, sampler, on_forward)
        self.lookahead, self.max_nodes, self.max_depth = (
            self.inner.lookahead,
            self.inner.max_nodes,
            self.inner.max_depth,
        )

    def propose(self, scheduled, budgets: list[int]) -> list[DraftTree]:
        return self.tamper(scheduled, budgets, self.inner.propose(scheduled, budgets))

    def observe(self, seq, start: int, features: torch.Tensor) -> None:
        pass


_tampered_ids = itertools.count()


def tampered_method(tamper: Tamper) -> str:
    """Register a drafter method whose draft model's proposals `tamper` rewrites; returns its name."""
    name = f"tampered-{next(_tampered_ids)}"
    register_drafter(
        DrafterMethod(
            name,
            functools.partial(TamperedDrafter, tamper),
            needs_model=True,
            trees=True,
            sampling=True,
            target_features=False,
            help="a test's tampered draft model",
        )
    )
    return name
