"""The `fspad` drafter: a trained FSPAD feature drafter (see `fspad_model.py`) grows EAGLE-2 trees.

It reads the target's own final-norm features, which the speculative decoder hands over after each verification
(`observe`): the features of every token the target computed and committed. Its one-layer cache, indexed by the
target's block tables like the draft model's, holds at position i the pair (feature f_i, token i+1). At a proposal
it first catches up on the pairs it has not yet seen (one chunk per sequence), whose last row (the committed
feature before the root, with the root token) yields the root's children and the feature they continue from; each
expanded node then runs with its parent's predicted feature. A sequence whose last prompt chunk is in this very
step has no features yet and drafts from the next step on.

Tree growth, chain sampling and the final cut are the draft model's (`DraftModelDrafter`); this drafter changes
what runs a frontier and where the root sits (one position earlier: the root's row is the last catch-up pair).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.request import Sequence
from leapserve.decoding.runner import ModelRunner, SeqChunk, step_metadata
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.scheduler import ScheduledSeq

from .draft_model import DraftModelDrafter, _Growing
from .fspad_model import FSPADConfig, FSPADModel, from_eagle_layout

DRAFTER_TYPE = "fspad"


@dataclass
class _FeatureState:
    computed: int = 0  # draft-cache positions holding (f_i, token i+1) pairs: i < computed
    pending: list[torch.Tensor] = field(default_factory=list)  # target features of positions computed, computed+1..
    num_features: int = 0  # computed + the rows of pending (kept, not summed: pending grows while plain decoding)
    written: list[int] = field(default_factory=list)  # unused (a draft model's chain reuse); kept for the base

    def restart(self, computed: int = 0) -> None:
        """Nothing pending; the draft cache holds the first `computed` pairs."""
        self.computed = self.num_features = computed
        self.pending = []


def load_fspad(path: str | Path, device: torch.device, dtype: torch.dtype) -> FSPADModel:
    """An FSPAD checkpoint directory (`config.json` + `model.safetensors`): as `leapserve train fspad` writes it,
    or exported to the EAGLE layout by `leapserve train export-eagle`."""
    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"FSPAD drafter {path}: needs config.json and model.safetensors "
                                "(train one with `leapserve train fspad`)")
    raw = json.loads(config_file.read_text())
    if raw.get("leapserve_drafter") == DRAFTER_TYPE:
        config, state = FSPADConfig.from_dict(raw), load_file(str(weights))
    elif "leapserve_fspad" in raw:
        config, state = from_eagle_layout(load_file(str(weights)), raw)
    else:
        raise ValueError(f"{path} is not an FSPAD drafter checkpoint (its config.json has neither "
                         f"\"leapserve_drafter\": \"{DRAFTER_TYPE}\" nor \"leapserve_fspad\")")
    model = FSPADModel(config)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


class FSPADDrafter(DraftModelDrafter):
    needs_target_features = True

    def __init__(self, spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler):
        target = runner.cache
        self.model = load_fspad(spec.model, runner.device, target.k[0].dtype)
        c = self.model.config
        if c.target_vocab_size != runner.model.config.vocab_size or c.hidden_size != runner.model.config.hidden_size:
            raise ValueError(f"speculative_config: FSPAD drafter {spec.model} was trained for a target with vocabulary "
                             f"{c.target_vocab_size} and hidden size {c.hidden_size}, not this one")
        self.embed = runner.model.get_input_embeddings()
        self.head = self.model.draft_head(runner.model.get_output_embeddings().weight).detach()
        self.cache = PagedKVCache(1, target.num_blocks, target.block_size, c.num_key_value_heads, c.head_dim,
                                  target.k[0].dtype, runner.device)
        self.device = runner.device
        if c.draft_vocab_size != c.target_vocab_size:
            self.vocab, self.vocab_size = self.model.draft_to_target, c.target_vocab_size
        self._init_tree(spec, sampler)

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """The target's features of positions `start, start + 1, ...` (committed tokens), in order."""
        state = self._state.setdefault(seq, _FeatureState())
        if start != state.num_features:  # preempted and recomputed (or out of step): start over
            state.restart()
            if start != 0:
                return
        state.pending.append(features)
        state.num_features += len(features)

    def _catch_up(self, s: ScheduledSeq, budget: int) -> SeqChunk | None:
        """The (feature, next token) pairs not yet in the draft cache; the last one is the root's row. None while
        the features of the sequence's last prompt chunk are still to come."""
        state = self._state.setdefault(s.seq, _FeatureState())
        if s.seq.num_computed < state.computed:  # preempted: its blocks (and our K/V) are gone
            state.restart()
        tokens = s.seq.token_ids
        if budget == 0 or state.num_features != len(tokens) - 1 or len(tokens) < 2:
            return None
        start = state.computed
        chunk = SeqChunk(s.seq.block_table, start, tokens[start + 1:], logits_rows=[len(tokens) - 2 - start],
                         extra={"features": torch.cat(state.pending)})
        state.restart(len(tokens) - 1)
        return chunk

    def _frontier_chunk(self, g: _Growing) -> SeqChunk:
        """The base's chunk, with each node's input feature: its parent's predicted feature."""
        chunk = super()._frontier_chunk(g)
        nodes = g.frontier if self.shape.is_chain else g.expanded
        chunk.extra["features"] = torch.stack([g.states[g.parents[n - 1]] for n in nodes])
        return chunk

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits over the draft vocabulary (`vocab`) and predicted features, at the chunks' logits rows."""
        meta, positions, offsets = step_metadata(chunks, self.cache, self.device)
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64, device=self.device)
        feats = torch.cat([c.extra["features"] for c in chunks]).to(device=self.device, dtype=self.head.dtype)
        token_half, feature_half = self.model(feats[None], self.embed(ids)[None], positions[None], meta)
        rows = torch.tensor([lo + r for c, lo in zip(chunks, offsets) for r in c.logits_rows], device=self.device)
        return (token_half[0, rows] @ self.head.T).float(), feature_half[0, rows]
