"""The registry of drafter methods (`speculative_config.method`): which drafter each builds and what it supports.

A plugin adds its own method with `register_drafter`; `make_drafter` (`drafter.py`) builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DrafterMethod:
    """A `speculative_config.method`: which drafter it builds and what that drafter supports."""

    name: str
    # "module:Class", imported when first built, or the class / a factory: (spec, runner, sampler, *, on_forward)
    # -> a `drafter.Drafter`
    factory: str | Callable[..., Any]
    needs_model: bool  # reads a checkpoint: `speculative_config.model` is required
    trees: bool  # grows static and dynamic trees (`tree`); else chains only
    sampling: bool  # under sampling, draws its chains from its own distribution q (else proposes deterministically)
    target_features: bool  # reads the target's features (`Drafter.observe`)
    help: str


DRAFTER_METHODS: dict[str, DrafterMethod] = {
    m.name: m
    for m in (
        DrafterMethod(
            "ngram",
            "leapserve.drafters.ngram:NgramDrafter",
            needs_model=False,
            trees=False,
            sampling=False,
            target_features=False,
            help="prompt lookup over the request's own tokens, no weights",
        ),
        DrafterMethod(
            "draft_model",
            "leapserve.drafters.draft_model:DraftModelDrafter",
            needs_model=True,
            trees=True,
            sampling=True,
            target_features=False,
            help="any causal LM sharing the target's tokenizer, e.g. an AdaSPEC draft",
        ),
        DrafterMethod(
            "fspad",
            "leapserve.drafters.fspad:FSPADDrafter",
            needs_model=True,
            trees=True,
            sampling=True,
            target_features=True,
            help="an FSPAD feature drafter trained with `leapserve train fspad`",
        ),
    )
}


def register_drafter(method: DrafterMethod) -> None:
    """Make `method.name` a valid `speculative_config.method`."""
    if method.name in DRAFTER_METHODS:
        raise ValueError(f"drafter method {method.name!r} is already registered")
    DRAFTER_METHODS[method.name] = method


def drafter_method(name: object) -> DrafterMethod:
    """The registered method called `name`."""
    if not isinstance(name, str) or name not in DRAFTER_METHODS:
        raise ValueError(f"speculative_config: method must be one of {tuple(DRAFTER_METHODS)}, got {name!r}")
    return DRAFTER_METHODS[name]
