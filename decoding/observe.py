"""The engine's observation seam: an injectable clock, and observers told of every model forward and every step.

Whatever watches the engine (benchmarks, profiling, a modeled accelerator, tests) is passed in here at construction,
`LLMEngine(config, clock=..., observers=[...])`, and sees the engine only through it. The clock also times the
speculative decoder's mode choice, so a virtual clock changes what the engine decides, as it would on that hardware.

A running `torch.profiler` also sees named ranges (`profiled_range`): every engine step (`STEP_RANGE`), every model
forward (`MODEL_RANGE`: the model, its LM head) and every attention layer (`ATTENTION_RANGE`: K/V write and
attention), which is how `bench offline --profile` splits a step without tracing Python. They cost nothing while no
profiler runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

Clock = Callable[[], float]  # seconds, monotonic
ForwardHook = Callable[[int], None]  # told each forward's token count before it runs

STEP_RANGE = "leapserve.step"
MODEL_RANGE = "leapserve.model"
ATTENTION_RANGE = "leapserve.attention"
_NO_RANGE = nullcontext()


def profiled_range(name: str) -> AbstractContextManager:
    """A range named `name` in the running torch profiler; nothing (one C call) when none runs."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else _NO_RANGE


@dataclass(frozen=True)
class StepRecord:
    """One engine step."""

    mode: str  # "draft": some sequence verified draft tokens; "plain": none did
    sequences: int  # sequences that could commit tokens (the others only computed a prompt chunk)
    prompt_tokens: int  # tokens computed beyond one per such sequence: prompt chunks
    committed_tokens: int
    target_forwards: int
    draft_forwards: int
    seconds: float

    @property
    def drafted(self) -> bool:
        return self.mode == "draft"


class StepObserver:
    """Override what you need; the engine calls these on its own thread."""

    def on_forward(self, model: str, num_tokens: int) -> None:
        """A forward of `model` ("target" or "draft") over `num_tokens` packed tokens is about to run."""

    def on_step(self, record: StepRecord) -> None:
        """A step has ended."""


class Observers:
    """The clock and the observers of one engine, and its forward counts (which the step records difference)."""

    def __init__(self, clock: Clock = time.perf_counter, observers: Sequence[StepObserver] = ()) -> None:
        self.clock = clock
        self.observers = list(observers)
        self.forwards = {"target": 0, "draft": 0}

    def forward(self, model: str, num_tokens: int) -> None:
        self.forwards[model] += 1
        for o in self.observers:
            o.on_forward(model, num_tokens)

    def on_target_forward(self, num_tokens: int) -> None:
        self.forward("target", num_tokens)

    def on_draft_forward(self, num_tokens: int) -> None:
        self.forward("draft", num_tokens)

    def step(self, record: StepRecord) -> None:
        for o in self.observers:
            o.on_step(record)
