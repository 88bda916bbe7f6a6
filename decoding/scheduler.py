"""Continuous batching: decides which sequences run this step and how many of their tokens; executes nothing."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import SchedulerConfig
from .kv_cache import PagedKVCache
from .request import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens of the sequence whose K/V are computed this step (prompt chunk, or 1 when decoding)

    @property
    def completes_prefix(self) -> bool:
        """True when this step reaches the sequence's last known token, so its next token can be produced."""
        return self.seq.num_computed + self.num_new == len(self.seq.token_ids)


class Scheduler:
    """FCFS; admits waiting sequences while blocks are free; preempts the newest running one (recompute) when out."""

    def __init__(self, config: SchedulerConfig, cache: PagedKVCache):
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.block_table)
        seq.drop_kv_cache()
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self, lookahead: Callable[[Sequence], int] = lambda seq: 0) -> list[ScheduledSeq]:
        """Pick this step's work. `lookahead(seq)` extra cache slots are reserved for each scheduled sequence (draft
        tokens, a diffusion canvas)."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed, budget)
            while not self.cache.grow(seq.block_table, seq.num_kv_slots + num_new + lookahead(seq)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.WAITING:  # preempted itself: nothing else could make room
                break
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        # Admit in arrival order; keep a block per running sequence free so the next decode step needn't preempt.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed, budget)
            needed = self.cache.blocks_needed(seq.block_table, seq.num_kv_slots + num_new + lookahead(seq))
            if needed + len(self.running) > self.cache.num_free_blocks:
                break
            self.cache.grow(seq.block_table, seq.num_kv_slots + num_new + lookahead(seq))
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled
