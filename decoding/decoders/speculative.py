"""Speculative decoding: a drafter proposes a candidate tree per sequence, the target verifies all of them in one
forward, and each sequence commits its own accepted path plus a bonus token.

Layouts (EMS-SD, seed-methods section 1): `packed` concatenates every sequence's `[last token] + candidates`
with no padding, each with its own count (0 allowed); `padded` is the vanilla baseline's input padding: every
drafting sequence drafts the same number of tokens and is padded with dummy rows to the batch's widest tree.
(The vanilla baseline's KV padding needs no emulation: with a paged cache each sequence keeps its own length.)
"""
from __future__ import annotations

import math
from weakref import WeakKeyDictionary

import torch

from leapserve.kernels import move_kv

from ..config import EngineConfig, SpeculativeConfig
from ..drafter import DraftTree, make_drafter
from ..request import Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sampler, SequenceError
from ..scheduler import ScheduledSeq
from ..tree import chunk_layout
from ..verification import verify
from .base import Decoder, SeqStep

EMA_DECAY = 0.7  # weight of the past in the per-sequence EMA of accepted tokens per step


class SpeculativeDecoder(Decoder):
    name = "speculative"

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig):
        super().__init__(runner, sampler, config)
        if not config.speculative_config:
            raise ValueError('decoder "speculative" needs a speculative_config, e.g. '
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        self.spec = SpeculativeConfig.from_dict(config.speculative_config)
        self.drafter = make_drafter(self.spec, runner, sampler)
        self.lookahead = self.drafter.lookahead
        self.max_nodes = self.drafter.max_nodes
        self.max_depth = self.drafter.max_depth
        self._accept_ema: WeakKeyDictionary[Sequence, float] = WeakKeyDictionary()

    def _budgets(self, scheduled: list[ScheduledSeq]) -> list[int]:
        """Draft tokens per sequence: none while prefilling; at most what max_tokens leaves; adaptive: sized by
        the sequence's recent acceptance and shrunk as the batch grows (0 = plain decoding)."""
        drafting = [s for s in scheduled if s.completes_prefix]
        cap = self.max_nodes
        if self.spec.adaptive and drafting:
            cap = min(cap, self.spec.max_batch_draft_tokens // len(drafting))
        budgets = []
        for s in scheduled:
            if not s.completes_prefix:
                budgets.append(0)
                continue
            seq = s.seq
            left = (seq.params.max_tokens or 1 << 30) - seq.num_output - 1  # the bonus token always comes
            budget = cap if left >= self.max_depth else min(cap, left)
            if self.spec.adaptive:
                ema = self._accept_ema.get(seq, float(self.max_depth))
                budget = min(budget, math.ceil(self.max_nodes * min(1.0, (ema + 1) / self.max_depth)))
            budgets.append(max(0, budget))
        if self.spec.layout == "padded":  # vanilla: one draft length for the whole batch
            width = max(budgets, default=0)
            budgets = [width if s.completes_prefix else 0 for s in scheduled]
        return budgets

    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        budgets = self._budgets(scheduled)
        trees = self.drafter.propose(scheduled, budgets)
        width = max(budgets, default=0)
        chunks = [self._chunk(s, t, width - len(t) if self.spec.layout == "padded" and s.completes_prefix else 0)
                  for s, t in zip(scheduled, trees)]
        logits = self.runner.execute(chunks)
        results: dict[Sequence, SeqStep] = {}
        row = 0
        for s, tree in zip(scheduled, trees):
            if not s.completes_prefix:
                results[s.seq] = SeqStep()
                continue
            seq_logits = logits[row:row + len(tree) + 1]
            row += len(tree) + 1
            try:
                accepted, samples = verify(tree, seq_logits, s.seq, self.sampler)
            except SequenceError as e:
                results[s.seq] = SeqStep(error=e)
                continue
            self._compact(s.seq, accepted)
            if len(tree):
                old = self._accept_ema.get(s.seq, float(self.max_depth))
                self._accept_ema[s.seq] = EMA_DECAY * old + (1 - EMA_DECAY) * len(accepted)
            results[s.seq] = SeqStep(samples=samples, forwarded=True, draft_tokens=len(tree),
                                     accepted_tokens=len(accepted))
        return results

    @staticmethod
    def _chunk(s: ScheduledSeq, tree: DraftTree, num_pad: int) -> SeqChunk:
        """`[tokens to compute] + candidates (+ pads)`; logits at the root and at every candidate."""
        seq = s.seq
        start = seq.num_computed
        prefix = seq.token_ids[start:start + s.num_new]
        if not s.completes_prefix:
            return SeqChunk(seq.block_table, start, prefix, logits_rows=[])
        rows = list(range(len(prefix) - 1, len(prefix) + len(tree)))
        if not len(tree) and not num_pad:
            return SeqChunk(seq.block_table, start, prefix, logits_rows=rows)
        mask, offsets = chunk_layout(len(prefix), tree.parents, num_pad)
        return SeqChunk(seq.block_table, start, prefix + tree.tokens + [prefix[-1]] * num_pad, logits_rows=rows,
                        positions=[start + o for o in offsets], tree_mask=mask)

    def _compact(self, seq: Sequence, accepted: list[int]) -> None:
        """Move the accepted nodes' K/V (node i sits at cache position root + i) to root + 1, root + 2, ..."""
        root = len(seq.token_ids) - 1
        moves = [(root + node, root + depth) for depth, node in enumerate(accepted, start=1) if node != depth]
        if not moves:
            return
        cache = self.runner.cache
        bs = cache.block_size

        def slots(positions: list[int]) -> torch.Tensor:
            return torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in positions], dtype=torch.int64,
                                device=self.runner.device)

        src, dst = slots([m[0] for m in moves]), slots([m[1] for m in moves])
        for k, v in zip(cache.k, cache.v):
            move_kv(k, v, src, dst)
