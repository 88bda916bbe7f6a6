"""A request and its sequences (one per completion when n > 1), as the scheduler and decoders see them."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar
from weakref import WeakKeyDictionary

import torch

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured_output import SequenceGrammar


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + generated
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # per-sequence RNG when the request has a seed
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    # Cache slots [lo, hi) that hold no token: the `padded` speculative layout advances every sequence by the
    # batch's longest accepted path and masks the shortfall, as the vanilla baseline does. Without holes (every
    # other decoder) token i sits in slot i.
    kv_holes: list[tuple[int, int]] = field(default_factory=list)
    num_kv_holes: int = 0
    status: SeqStatus = SeqStatus.WAITING
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    grammar: SequenceGrammar | None = None  # with `params.structured_outputs`: where its output is in the grammar
    target_forwards: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    num_drafts: int = 0  # verifications with at least one draft token
    denoising_steps: int = 0  # diffusion decoding steps
    sequential_forwards: int = 0  # model forwards it took part in (decoders that count them: silent-thought)
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: verifications that accepted draft i + 1

    def count_accepted(self, num_accepted: int) -> None:
        """Record one verification of drafts that accepted the first `num_accepted` of its path."""
        self.num_drafts += 1
        if num_accepted > len(self.accepted_per_position):
            self.accepted_per_position.extend([0] * (num_accepted - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_kv_slots(self) -> int:
        """Cache slots in use: computed tokens plus holes (the next token's K/V goes to this slot)."""
        return self.num_computed + self.num_kv_holes

    def add_kv_hole(self, num_slots: int) -> None:
        """Leave the next `num_slots` cache slots masked (never attended)."""
        lo = self.num_kv_slots
        self.kv_holes.append((lo, lo + num_slots))
        self.num_kv_holes += num_slots

    def drop_kv_cache(self) -> None:
        """Forget the cache contents (preemption): recomputed later, densely."""
        self.num_computed = 0
        self.kv_holes.clear()
        self.num_kv_holes = 0

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def visible_text(self) -> str:
        """Generated text, minus a tail that could still grow into a stop string."""
        if self.finished or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[: max(0, len(self.text) - hold)]

    def completion_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=self.output_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()  # tokens that end a sequence: held back until `min_tokens`
    arrival_time: float = field(default_factory=time.time)
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None
    # with `params.prompt_logprobs`: per prompt token, its logprob and the top k given the tokens before it (None
    # for the first); filled as the prompt's chunks are computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        metrics = RequestMetrics(
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time,
            finished_time=self.finished_time,
            target_forwards=sum(s.target_forwards for s in self.seqs),
            draft_tokens=sum(s.draft_tokens for s in self.seqs),
            accepted_tokens=sum(s.accepted_tokens for s in self.seqs),
            num_drafts=sum(s.num_drafts for s in self.seqs),
            denoising_steps=sum(s.denoising_steps for s in self.seqs),
            sequential_forwards=sum(s.sequential_forwards for s in self.seqs),
            accepted_per_position=[
                sum(c) for c in itertools.zip_longest(*(s.accepted_per_position for s in self.seqs), fillvalue=0)
            ],
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion_output() for s in self.seqs],
            finished=self.finished,
            metrics=metrics,
            error=self.error,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
        )


T = TypeVar("T")


class PerSequence(Generic[T]):
    """A decoder's or drafter's state for each sequence: made by `make` on first use, dropped with the sequence."""

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._items: WeakKeyDictionary[Sequence, T] = WeakKeyDictionary()

    def __getitem__(self, seq: Sequence) -> T:
        item = self._items.get(seq)
        if item is None:
            item = self._items[seq] = self._make()
        return item

    def values(self) -> list[T]:
        """The state of every sequence still alive that has some."""
        return list(self._items.values())

    def get(self, seq: Sequence) -> T | None:
        """The sequence's state if it has been made, without making it."""
        return self._items.get(seq)
