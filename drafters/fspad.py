"""The `fspad` drafter: a trained FSPAD feature drafter (see `fspad_model.py`) grows EAGLE-2 trees.

It reads the target's own final-norm features, which the speculative decoder hands over after each verification
(`observe`): the features of every token the target computed and committed. Its one-layer cache, indexed by the
target's block tables like the draft model's, holds at position i the pair (feature f_i, token i+1). At a proposal
it first catches up on the pairs it has not yet seen (one chunk per sequence), whose last row (the committed
feature before the root, with the root token) yields the root's children and the feature they continue from; each
expanded node then runs with its parent's predicted feature. A sequence whose last prompt chunk is in this very
step has no features yet and drafts from the next step on.

Tree growth, chain sampling and the final cut are the `TreeGrower`'s, as for the draft model; the root sits one
position earlier than there (its row is the last catch-up pair).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leapserve.decoding.attention import forward_context
from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.model_loader import resolve_dtype
from leapserve.decoding.observe import MODEL_RANGE, ForwardHook, profiled_range
from leapserve.decoding.request import PerSequence, Sequence
from leapserve.decoding.runner import ModelRunner, SeqChunk, capture_settings, compiled, step_metadata
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.scheduler import ScheduledSeq
from leapserve.decoding.step_buffers import StepBuffers
from leapserve.kernels.packed_linear import PackedLinear, cpu_computes_bf16, pack_linears, run_through_op

from .checkpoints import load_fspad
from .tree_growth import TreeGrower

logger = logging.getLogger(__name__)

# A proposal's catch-up runs at most CATCH_UP_PAIRS pairs over the batch, and at least CATCH_UP_WINDOW per sequence:
# older pairs not yet in the draft cache stay out of it, a hole its attention skips. Plain decoding leaves a backlog
# of every token since the last proposal (whole prompts, for a probe of drafting after a stretch of plain steps),
# and one drafter layer reads mostly its nearest context (docs/adaptive-speculation.md, "Catch-up window").
CATCH_UP_PAIRS = 512
CATCH_UP_WINDOW = 32


@dataclass
class _FeatureState:
    computed: int = 0  # draft-cache positions holding (f_i, token i+1) pairs, or hidden in holes: i < computed
    pending: list[torch.Tensor] = field(default_factory=list)  # target features of positions computed, computed+1..
    num_features: int = 0  # computed + the rows of pending (kept, not summed each time)
    holes: list[tuple[int, int]] = field(default_factory=list)  # draft-cache ranges never written (window skips)

    def restart(self) -> None:
        """Nothing pending, nothing in the draft cache."""
        self.computed = self.num_features = 0
        self.pending, self.holes = [], []

    def keep_last(self, n: int) -> None:
        """Hide all but the last `n` pending pairs: their draft-cache positions become a hole."""
        start = self.num_features - n
        if start <= self.computed:
            return
        if self.holes and self.holes[-1][1] == self.computed:
            self.holes[-1] = (self.holes[-1][0], start)
        else:
            self.holes.append((self.computed, start))
        drop, self.computed = start - self.computed, start
        while drop:
            first = self.pending[0]
            if len(first) <= drop:
                self.pending.pop(0)
                drop -= len(first)
            else:
                self.pending[0], drop = first[drop:], 0


def draft_dtype(dtype: str, target_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The drafter's weights and cache: `dtype` as named, or for "auto" bf16 under an fp32 target on a CPU whose
    oneDNN computes bf16 (half the bytes a draft level streams; BENCHMARKS.md, "The drafter in bf16 under an fp32
    target"), else the target's dtype. Its proposals are verified by the target either way: outputs do not change."""
    if dtype != "auto":
        return resolve_dtype(dtype, device)
    cpu_bf16 = device.type == "cpu" and cpu_computes_bf16()
    return torch.bfloat16 if target_dtype == torch.float32 and cpu_bf16 else target_dtype


class FSPADDrafter:
    needs_target_features = True

    def __init__(
        self, spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler, *, on_forward: ForwardHook | None = None
    ):
        target, target_dtype = runner.cache, runner.cache.k[0].dtype
        dtype = draft_dtype(spec.dtype, target_dtype, runner.device)
        self.model = load_fspad(spec.model, runner.device, dtype)
        if dtype != target_dtype:
            logger.info("the FSPAD drafter runs in %s under the %s target", dtype, target_dtype)
        c = self.model.config
        if c.target_vocab_size != runner.model.config.vocab_size or c.hidden_size != runner.model.config.hidden_size:
            raise ValueError(
                f"speculative_config: FSPAD drafter {spec.model} was trained for a target with vocabulary "
                f"{c.target_vocab_size} and hidden size {c.hidden_size}, not this one"
            )
        self.embed = runner.model.get_input_embeddings()
        lm_head = runner.model.get_output_embeddings().weight
        self.head = PackedLinear(self.model.draft_head(lm_head).to(dtype))  # [V_draft, d]
        if runner.llama is not None:  # the target runs on leapserve's Llama: its prepacked GEMMs here too
            pack_linears(self.model)
        self.cache = PagedKVCache(
            1, target.num_blocks, target.block_size, c.num_key_value_heads, c.head_dim, dtype, runner.device
        )
        self.device = runner.device
        self.buffers = StepBuffers(runner.device)
        self.on_forward = on_forward
        reduced = c.draft_vocab_size != c.target_vocab_size  # logit columns are draft_to_target's token ids
        self.grower = TreeGrower(spec, sampler, self.model.draft_to_target if reduced else None, c.target_vocab_size)
        shape = self.grower.shape
        self.max_nodes, self.max_depth, self.lookahead = shape.max_nodes, shape.num_levels, shape.lookahead
        self._state = PerSequence(_FeatureState)
        self._forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] = functools.partial(self.model, paged=True)
        if runner.compile and runner.llama is not None:  # compiled as the target is
            self._forward = compiled(self._forward, runner.device)
            run_through_op(self.head)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile now, as the target's runner does (1 token, then 2 or more), writing into block 0."""
        d = self.model.config.hidden_size
        with capture_settings():
            for n in (1, 2, 3):
                self._run([SeqChunk([0], 0, [0] * n, [n - 1], extra={"features": torch.zeros(n, d)})])

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        window = max(CATCH_UP_WINDOW, CATCH_UP_PAIRS // max(1, sum(b > 0 for b in budgets)))  # pairs per sequence
        return self.grower.propose(scheduled, budgets, functools.partial(self._catch_up, window=window), self.execute)

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """The target's features `[n, d]` of positions `start, start + 1, ...` (committed tokens), in order."""
        state = self._state[seq]
        if start != state.num_features:  # preempted and recomputed (or out of step): start over
            state.restart()
            if start != 0:
                return
        state.pending.append(features)
        state.num_features += len(features)
        if state.num_features - state.computed > 2 * CATCH_UP_PAIRS:  # bounded while decoding plainly
            state.keep_last(CATCH_UP_PAIRS)

    def _catch_up(self, s: ScheduledSeq, budget: int, window: int) -> SeqChunk | None:
        """The (feature, next token) pairs not yet in the draft cache, at most the last `window`; the last one is the
        root's row. None while the features of the sequence's last prompt chunk are still to come."""
        state = self._state[s.seq]
        if s.seq.num_computed < state.computed:  # preempted: its blocks (and our K/V) are gone
            state.restart()
        tokens = s.seq.token_ids
        if budget == 0 or state.num_features != len(tokens) - 1 or len(tokens) < 2:
            return None
        state.keep_last(window)
        start, end = state.computed, state.num_features
        chunk = SeqChunk(
            s.seq.block_table,
            start,
            tokens[start + 1 :],
            logits_rows=[end - 1 - start],
            context_holes=list(state.holes),
            extra={"features": torch.cat(state.pending)},
        )
        state.computed, state.pending = end, []
        return chunk

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's one forward: logits `[rows, V_draft]` over the draft vocabulary and predicted features
        `[rows, d]`, at the chunks' logits rows; each chunk carries its tokens' input features in `extra`."""
        if self.on_forward is not None:
            self.on_forward(sum(len(c.token_ids) for c in chunks))
        return self._run(chunks)

    @torch.inference_mode()
    def _run(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        meta, positions, offsets = step_metadata(chunks, self.cache, self.buffers)
        ids = self.buffers.put("input_ids", [t for c in chunks for t in c.token_ids], torch.int64)
        dtype = self.head.weight.dtype
        feats = torch.cat([c.extra["features"] for c in chunks]).to(device=self.device, dtype=dtype)
        rows = self.buffers.put(
            "logits_rows", [lo + r for c, lo in zip(chunks, offsets) for r in c.logits_rows], torch.int64
        )
        with profiled_range(MODEL_RANGE), forward_context(meta):
            token_half, feature_half = self._forward(feats[None], self.embed(ids).to(dtype)[None], positions[None])
            return self.head(token_half[0, rows]).float(), feature_half[0, rows]
