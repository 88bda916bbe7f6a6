"""The `draft_model` drafter: a small causal LM sharing the target's tokenizer drafts chains or trees.

It keeps its own paged KV cache with the target's geometry, indexed by the target's block tables, so the
scheduler's block allocation covers both. Per sequence it remembers how many leading tokens its cache holds
(`computed`) and which chain drafts it wrote after them; at the next proposal, drafts the target accepted are
reused and the rest of the sequence is caught up in one chunk (prompts included, so no separate prefill).
A preemption shows as `seq.num_computed` dropping below `computed` and resets the sequence. Trees grow from
there (`TreeGrower`); the checkpoint is loaded by `load_draft_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.observe import ForwardHook
from leapserve.decoding.request import PerSequence, Sequence
from leapserve.decoding.runner import ModelRunner, SeqChunk
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.scheduler import ScheduledSeq

from .checkpoints import load_draft_model
from .tree_growth import TreeGrower


@dataclass
class _CacheState:
    computed: int = 0  # leading tokens of the sequence whose K/V are in the draft cache
    written: list[int] = field(default_factory=list)  # chain drafts whose K/V follow them


class DraftModelDrafter:
    needs_target_features = False

    def __init__(
        self, spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler, *, on_forward: ForwardHook | None = None
    ):
        target = runner.cache
        model = load_draft_model(spec.model, runner.model, runner.device, target.k[0].dtype)
        hf, target_vocab = model.config, runner.model.config.vocab_size
        if hf.vocab_size != target_vocab:
            raise ValueError(
                f"speculative_config: the draft model's vocabulary ({hf.vocab_size}) differs from "
                f"the target's ({target_vocab}); it must share the target's tokenizer"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.cache = PagedKVCache(
            hf.num_hidden_layers,
            target.num_blocks,
            target.block_size,
            hf.num_key_value_heads,
            head_dim,
            target.k[0].dtype,
            runner.device,
        )
        self.runner = ModelRunner(
            model, self.cache, runner.device, model_impl=runner.model_impl, compile=runner.compile
        )
        self.on_forward = on_forward
        self.grower = TreeGrower(spec, sampler)
        shape = self.grower.shape
        self.max_nodes, self.max_depth, self.lookahead = shape.max_nodes, shape.num_levels, shape.lookahead
        self._state = PerSequence(_CacheState)

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        trees = self.grower.propose(scheduled, budgets, self._catch_up, self.execute)
        if self.grower.shape.is_chain:  # the grower ran every node but the last: their K/V follow the sequence's
            for s, tree in zip(scheduled, trees):
                if len(tree):
                    self._state[s.seq].written = tree.tokens[:-1]
        return trees

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """Reads no target features."""

    def _catch_up(self, s: ScheduledSeq, budget: int) -> SeqChunk | None:
        """The chunk that brings the draft cache up to the sequence's last token, whose logits row is the root's
        (None: no proposal). Chain drafts the target accepted are reused, not recomputed."""
        state = self._state[s.seq]
        if s.seq.num_computed < state.computed:  # preempted: its blocks (and our K/V) are gone
            state.computed, state.written = s.seq.num_computed, []
        if budget == 0:
            return None
        tokens = s.seq.token_ids
        start = state.computed
        while (
            start - state.computed < len(state.written)
            and start < len(tokens) - 1
            and state.written[start - state.computed] == tokens[start]
        ):
            start += 1
        state.computed, state.written = len(tokens), []
        return SeqChunk(s.seq.block_table, start, tokens[start:], logits_rows=[len(tokens) - 1 - start])

    def execute(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, None]:
        """The draft's one forward: logits `[rows, V]` at the chunks' logits rows (and no per-row state)."""
        if self.on_forward is not None:
            self.on_forward(sum(len(c.token_ids) for c in chunks))
        return self.runner.execute(chunks), None
