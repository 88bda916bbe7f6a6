"""Speculative decoding: a drafter proposes a candidate tree per sequence, the target verifies all of them in one
forward, and each sequence commits its own accepted path plus a bonus token.

Layouts (EMS-SD): `packed` concatenates every sequence's `[last token] + candidates`
with no padding, each with its own count (0 allowed), and each sequence advances by its own accepted length;
`padded` reproduces the vanilla baseline: every drafting sequence drafts the same number of tokens, is padded
with dummy rows to the batch's widest tree, and advances its cache by the batch's longest accepted path, the
shortfall left as masked slots (`Sequence.kv_holes`, hidden from attention by the kernel's `context_mask`), so
`padded` pays for the padded rows and for the padded slots' memory and attention reads. Outputs are the same.

Adaptive speculation (`adaptive`): per step, `adaptive.ModeSelector` picks drafting or plain decoding (every budget
0: the autoregressive decoder's forward and sampling, no tree to verify), so that speculation is switched off where
it does not pay, e.g. at high concurrency on a compute-bound device; while drafting, `tree_budget.TreeSizer` sizes
the trees for the batch from the verification cost timed at start-up and the acceptance each node rank has had. The
sizer's first trees take the whole cap, to measure every rank; the selector does not time those steps (at most
`SIZING_STEPS`), so that drafting is judged at the budgets it will run.
"""

from __future__ import annotations

import logging

import torch

from ..config import EngineConfig, SpeculativeConfig
from ..drafter import DraftTree, make_drafter
from ..observe import Observers
from ..prompt_lookup import PromptLookup
from ..request import Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sampler, SequenceError, row_argmax
from ..scheduler import ScheduledSeq
from ..tree import chunk_layout
from ..verification import verify
from .adaptive import ModeSelector
from .base import Decoder, SeqStep
from .tree_budget import TreeSizer, VerifyCost

logger = logging.getLogger(__name__)

SIZING_STEPS = 16  # drafting steps at most, per decoder, that the mode selector does not time while the sizer measures


class SpeculativeDecoder(Decoder):
    name = "speculative"

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig, observers: Observers):
        super().__init__(runner, sampler, config, observers)
        if not config.speculative_config:
            raise ValueError(
                'decoder "speculative" needs a speculative_config, e.g. '
                '{"method": "ngram", "num_speculative_tokens": 4}'
            )
        self.spec = SpeculativeConfig.from_dict(config.speculative_config)
        self.drafter = make_drafter(self.spec, runner, sampler, on_forward=observers.on_draft_forward)
        self.lookahead = self.drafter.lookahead
        self.max_nodes = self.drafter.max_nodes
        self.lookup = None if self.spec.lookup is None else PromptLookup(**self.spec.lookup_settings())
        # the longest path a tree may have (a lookup chain can outgrow the drafter's levels, never its nodes)
        self.max_depth = max(self.drafter.max_depth, min(self.lookup.tokens if self.lookup else 0, self.max_nodes))
        self.sizer: TreeSizer | None = None
        if self.spec.adaptive:
            most = config.scheduler.max_num_seqs
            verified = most + min(most * self.max_nodes, self.spec.max_batch_draft_tokens)  # at most, in one step
            cost = VerifyCost.measure(
                lambda tokens: runner.time_forward(tokens, observers.clock, repeats=1),
                min(verified, runner.cache.num_blocks * runner.cache.block_size),
            )
            logger.info("verification cost by tokens: %s", cost.describe())
            self.sizer = TreeSizer(cost, self.max_nodes, self.drafter.max_depth)
        sized = self.sizer is not None
        self.selector = ModeSelector(
            predict=self._predicted_rate if sized else None, bound=self._rate_bound if sized else None
        )
        self._step_start = 0.0
        self._step_drafts: bool | None = None  # this step's mode, when the selector chose it
        self._step_timeable = False  # this step carries no prompt tokens: its time measures its mode
        self._step_sizing = False  # a drafting step at the cap while the sizer measures: not timed for the selector
        self._sizing_steps = 0  # such steps so far (at most SIZING_STEPS: a budget below the cap never measures it)

    def _budgets(self, scheduled: list[ScheduledSeq]) -> list[int]:
        """Draft tokens per sequence: none while prefilling; at most what max_tokens leaves; adaptive: none when
        the selector picks plain decoding, else at most max_batch_draft_tokens over the batch and sized by the
        tree sizer. Starts the step's clock."""
        self._step_start = self.observers.clock()
        drafting = [s for s in scheduled if s.completes_prefix]
        self._step_timeable = all(s.num_new == 1 for s in scheduled)
        self._step_sizing = False
        self._step_drafts = (
            self.selector.choose(len(drafting), self._step_timeable) if self.spec.adaptive and drafting else None
        )
        caps = iter([self.max_nodes] * len(drafting))
        if self._step_drafts is False:
            caps = iter([0] * len(drafting))
        elif self.sizer is not None and drafting:
            caps = iter(self.sizer.budgets(len(drafting), self._cap(len(drafting))))
            self._step_sizing = self._step_drafts is True and self.sizer.measuring and self._sizing_steps < SIZING_STEPS
            self._sizing_steps += self._step_sizing
        budgets = []
        for s in scheduled:
            if not s.completes_prefix:
                budgets.append(0)
                continue
            seq, cap = s.seq, next(caps)
            left = (seq.params.max_tokens or 1 << 30) - seq.num_output - 1  # the bonus token always comes
            budgets.append(max(0, cap if left >= self.max_depth else min(cap, left)))
        if self.spec.layout == "padded":  # vanilla: one draft length for the whole batch
            width = max(budgets, default=0)
            budgets = [width if s.completes_prefix else 0 for s in scheduled]
        return budgets

    def _cap(self, num_decoding: int) -> int:
        """Most draft nodes per sequence at this batch size."""
        return min(self.max_nodes, self.spec.max_batch_draft_tokens // num_decoding)

    def _predicted_rate(self, num_decoding: int) -> float | None:
        assert self.sizer is not None
        return self.sizer.predicted_rate(num_decoding, self._cap(num_decoding))

    def _rate_bound(self, num_decoding: int) -> float | None:
        assert self.sizer is not None
        return self.sizer.predicted_rate(num_decoding, self._cap(num_decoding), from_smaller=True)

    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        budgets = self._budgets(scheduled)
        trees = self.drafter.propose(scheduled, budgets)  # also where a drafter notices a preempted sequence
        if self.lookup is not None and any(budgets):
            trees = self.lookup.merge([s.seq for s in scheduled], budgets, trees)
        draft_seconds = self.observers.clock() - self._step_start
        width = max(budgets, default=0)
        chunks = [
            self._chunk(s, t, width - len(t) if self.spec.layout == "padded" and s.completes_prefix else 0)
            for s, t in zip(scheduled, trees)
        ]
        logits, hidden = self.runner.forward(chunks)
        if any(budgets):
            results = self._verify(scheduled, trees, chunks, budgets, logits, hidden)
        else:
            results = self._plain(scheduled, chunks, logits, hidden)
        self.score_prompts(scheduled, chunks, hidden, results)
        num_decoding = sum(s.completes_prefix for s in scheduled)
        seconds = self.observers.clock() - self._step_start
        if self.sizer is not None and self._step_timeable:
            if any(budgets):
                depth, num_tokens = min(self.drafter.max_depth, max(budgets)), sum(len(c.token_ids) for c in chunks)
                self.sizer.record_step(num_decoding, draft_seconds, depth, seconds, num_tokens)
            elif self._step_drafts is False:
                self.sizer.record_plain(num_decoding, seconds)
        if self._step_drafts is not None:
            self._report(scheduled, results, num_decoding, seconds)
        return results

    def _plain(
        self, scheduled: list[ScheduledSeq], chunks: list[SeqChunk], logits: torch.Tensor, hidden: torch.Tensor
    ) -> dict[Sequence, SeqStep]:
        """A step without drafts (plain decoding): sampled in one batch as the autoregressive decoder samples (what
        verifying empty trees commits), and a feature drafter observes every row, each chunk's tokens in order."""
        results = self.sample_rows(scheduled, logits)
        if self.drafter.needs_target_features:
            for s, features in zip(scheduled, hidden.split([len(c.token_ids) for c in chunks])):
                if results[s.seq].error is None:
                    self.drafter.observe(s.seq, s.seq.num_computed, features)
        return results

    def _verify(
        self,
        scheduled: list[ScheduledSeq],
        trees: list[DraftTree],
        chunks: list[SeqChunk],
        budgets: list[int],
        logits: torch.Tensor,
        hidden: torch.Tensor,
    ) -> dict[Sequence, SeqStep]:
        """Each sequence's tree verified against its rows of `logits`; the accepted paths' K/V moved into place, and
        the features of every committed token observed."""
        observes = self.drafter.needs_target_features
        results: dict[Sequence, SeqStep] = {}
        observed: list[tuple[Sequence, list[int]]] = []  # feature drafters: each sequence's hidden rows to observe
        argmax = row_argmax(logits, [s.seq for s in scheduled if s.completes_prefix])
        moves: list[tuple[int, int]] = []  # cache slots (from, to) of every accepted path, moved at once
        row = lo = 0
        for s, tree, chunk, budget in zip(scheduled, trees, chunks, budgets):
            lo, chunk_lo = lo + len(chunk.token_ids), lo
            if not s.completes_prefix:
                if observes:
                    observed.append((s.seq, list(range(chunk_lo, lo))))
                results[s.seq] = SeqStep()
                continue
            seq_logits = logits[row : row + len(tree) + 1]
            seq_argmax = None if argmax is None else argmax[row : row + len(tree) + 1]
            row += len(tree) + 1
            try:
                accepted, samples = verify(tree, seq_logits, s.seq, self.sampler, seq_argmax)
            except SequenceError as e:
                results[s.seq] = SeqStep(error=e)
                continue
            moves += self._compaction(s.seq, s.seq.num_kv_slots + s.num_new - 1, accepted)
            if observes:  # the features of every token this step computed and committed
                root = chunk_lo + s.num_new - 1
                observed.append((s.seq, list(range(chunk_lo, root + 1)) + [root + node for node in accepted]))
            if self.sizer is not None and budget:
                self.sizer.record_tree(budget, accepted)
            if self.lookup is not None and budget:
                self.lookup.record(s.seq, accepted)
            results[s.seq] = SeqStep(
                samples=samples, forwarded=True, draft_tokens=len(tree), accepted_tokens=len(accepted)
            )
        if moves:
            src, dst = zip(*moves)
            self.runner.cache.move_slots(list(src), list(dst))
        if self.spec.layout == "padded":  # vanilla: every sequence advances by the batch's longest accepted path
            verified = [results[s.seq] for s in scheduled if s.completes_prefix and results[s.seq].forwarded]
            longest = max((r.accepted_tokens for r in verified), default=0)
            for r in verified:
                r.masked_slots = longest - r.accepted_tokens
        if observed:  # one gather for the whole batch, then a view per sequence
            rows = torch.tensor([r for _, seq_rows in observed for r in seq_rows], device=hidden.device)
            for (seq, _), features in zip(observed, hidden[rows].split([len(r) for _, r in observed])):
                self.drafter.observe(seq, seq.num_computed, features)
        return results

    def _report(
        self, scheduled: list[ScheduledSeq], results: dict[Sequence, SeqStep], num_decoding: int, seconds: float
    ) -> None:
        """The step's committed tokens and time, to the mode selector."""
        tokens = sum(len(results[s.seq].samples) for s in scheduled if s.completes_prefix)
        self.selector.record(
            num_decoding, bool(self._step_drafts), tokens, seconds, self._step_timeable and not self._step_sizing
        )

    @staticmethod
    def _chunk(s: ScheduledSeq, tree: DraftTree, num_pad: int) -> SeqChunk:
        """`[tokens to compute] + candidates (+ pads)`; logits at the root and at every candidate. The chunk
        starts at the sequence's next free cache slot; rotary positions count tokens (holes take none)."""
        seq = s.seq
        start = seq.num_computed
        prefix = seq.token_ids[start : start + s.num_new]
        rows = list(range(len(prefix) - 1, len(prefix) + len(tree))) if s.completes_prefix else []
        tokens, mask = prefix, None
        offsets: list[int] | range = range(len(prefix))
        if s.completes_prefix and (len(tree) or num_pad):
            mask, offsets = chunk_layout(len(prefix), tree.parents, num_pad)
            tokens = prefix + tree.tokens + [prefix[-1]] * num_pad
        return SeqChunk(
            seq.block_table,
            seq.num_kv_slots,
            tokens,
            logits_rows=rows,
            positions=[start + o for o in offsets],
            tree_mask=mask,
            context_holes=seq.kv_holes,
        )

    def _compaction(self, seq: Sequence, root: int, accepted: list[int]) -> list[tuple[int, int]]:
        """The flat cache slots (from, to) that move the accepted nodes' K/V (node i sits at position root + i) to
        positions root + 1, root + 2, ..."""
        cache, moved = self.runner.cache, [(node, d) for d, node in enumerate(accepted, start=1) if node != d]
        src = cache.flat_slots(seq.block_table, (root + node for node, _ in moved))
        return list(zip(src, cache.flat_slots(seq.block_table, (root + depth for _, depth in moved))))
