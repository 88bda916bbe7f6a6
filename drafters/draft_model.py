"""A small causal LM sharing the target's tokenizer drafts chains or trees.

It keeps its own paged KV cache with the target's geometry, indexed by the target's block tables, so the
scheduler's block allocation covers both. Per sequence it remembers how many leading tokens its cache holds
(`computed`) and which chain drafts it wrote after them; at the next proposal, drafts the target accepted are
reused and the rest of the sequence is caught up in one chunk (prompts included, so no separate prefill).
A preemption shows as `seq.num_computed` dropping below `computed` and resets the sequence.

Trees grow level by level (EAGLE-2): each frontier node's children are its top-b tokens under the draft
distribution q, scored by cumulative log q. A static tree keeps every node; a dynamic one keeps `top_k`
frontier nodes per level and the best `total_tokens` nodes overall. A chain (branching 1) under sampling draws
each token from q (and records q for lossless verification) instead of taking the argmax.

A checkpoint whose config.json lists tensor names under `leapserve_shared_with_target` (AdaSPEC drafters share the
target's embeddings and LM head) stores only its own weights; those tensors are the target's (same objects).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch

from leapserve.decoding.config import ModelConfig, SpeculativeConfig
from leapserve.decoding.drafter import DraftTree, TreeShape
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.model_loader import load_model, resolve_model
from leapserve.decoding.request import Sequence
from leapserve.decoding.runner import ModelRunner, SeqChunk
from leapserve.decoding.sampler import Sampler, draw, processed_logits, target_probs
from leapserve.decoding.scheduler import ScheduledSeq
from leapserve.decoding.tree import chunk_layout

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SHARED_WITH_TARGET = "leapserve_shared_with_target"


@dataclass
class _CacheState:
    computed: int = 0  # leading tokens of the sequence whose K/V are in the draft cache
    written: list[int] = field(default_factory=list)  # chain drafts whose K/V follow them


@dataclass
class _Growing:
    """One sequence's tree while it grows; node 0 is the root."""
    seq: Sequence
    budget: int
    root_pos: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list[torch.Tensor | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=lambda: [0.0])
    paths: list[list[int]] = field(default_factory=lambda: [[]])  # tokens from the root's child down to node i
    expanded: list[int] = field(default_factory=list)  # nodes run through the draft model (cache order)
    frontier: list[int] = field(default_factory=lambda: [0])
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # per run node: a drafter's recurrent output

    def add(self, parent: int, token: int, logq: float, q: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.q.append(q)
        self.scores.append(self.scores[parent] + logq)
        self.paths.append(self.paths[parent] + [token])
        return len(self.tokens)


def assemble_draft(config: PretrainedConfig, weights: dict[str, torch.Tensor], target: torch.nn.Module,
                   shared: list[str], dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM of `config` holding `weights`, whose `shared` parameters are `target`'s own (same objects)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device, all replaced below; buffers (rotary) real
        draft = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keys = draft.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    if keys.unexpected_keys or set(keys.missing_keys) != set(shared):
        raise ValueError(f"the draft's weights do not match its config: missing "
                         f"{sorted(set(keys.missing_keys) - set(shared))}, unexpected {keys.unexpected_keys}, "
                         f"shared with the target {shared}")
    for name in shared:
        try:
            tensor = target.get_parameter(name)
        except AttributeError as e:
            raise ValueError(f"the draft shares {name!r} with the target, which has no such parameter") from e
        expected = draft.get_parameter(name)
        if tensor.shape != expected.shape or tensor.dtype != dtype:
            raise ValueError(f"the draft's {name} is {tuple(expected.shape)} {dtype}, the target's "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        module, _, attr = name.rpartition(".")
        setattr(draft.get_submodule(module), attr, tensor)
    return draft


def load_draft_model(model: str, target: torch.nn.Module, device: torch.device,
                     dtype: torch.dtype) -> torch.nn.Module:
    """Load a draft checkpoint in eval mode; the tensors it lists under `SHARED_WITH_TARGET` are `target`'s own."""
    source = resolve_model(model)
    config_path = Path(source) / "config.json"
    shared = json.loads(config_path.read_text()).get(SHARED_WITH_TARGET) if config_path.is_file() else None
    if not shared:
        return load_model(source, ModelConfig(model=model), device, dtype)
    from safetensors.torch import load_file
    from transformers import AutoConfig

    weights = {}
    for path in sorted(Path(source).glob("*.safetensors")):
        weights.update(load_file(str(path), device=str(device)))
    try:
        draft = assemble_draft(AutoConfig.from_pretrained(source), weights, target, shared, dtype)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return draft.to(device).eval()


class DraftModelDrafter:
    vocab: torch.Tensor | None = None  # token ids of `execute`'s logit columns (None: the whole vocabulary)
    vocab_size: int = 0  # with `vocab`: the whole vocabulary's size

    def __init__(self, spec: SpeculativeConfig, runner: ModelRunner, sampler: Sampler):
        target = runner.cache
        model = load_draft_model(spec.model, runner.model, runner.device, target.k[0].dtype)
        hf, target_vocab = model.config, runner.model.config.vocab_size
        if hf.vocab_size != target_vocab:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({hf.vocab_size}) differs from "
                             f"the target's ({target_vocab}); it must share the target's tokenizer")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.cache = PagedKVCache(hf.num_hidden_layers, target.num_blocks, target.block_size,
                                  hf.num_key_value_heads, head_dim, target.k[0].dtype, runner.device)
        self.runner = ModelRunner(model, self.cache, runner.device)
        self._init_tree(spec, sampler)

    def _init_tree(self, spec: SpeculativeConfig, sampler: Sampler) -> None:
        """The tree shape, its limits, and the per-sequence state (shared with drafters built on this one)."""
        self.sampler = sampler
        self.shape = TreeShape.from_config(spec)
        self.max_nodes = self.shape.max_nodes
        self.max_depth = self.shape.num_levels
        self.lookahead = max(self.max_nodes, self.shape.max_expanded)
        self._state: WeakKeyDictionary[Sequence, _CacheState] = WeakKeyDictionary()

    def propose(self, scheduled: list[ScheduledSeq], budgets: list[int]) -> list[DraftTree]:
        growing: list[_Growing] = []
        catch_up: list[SeqChunk] = []
        trees: list[DraftTree | _Growing] = []
        for s, budget in zip(scheduled, budgets):
            chunk = self._catch_up(s, budget)
            if chunk is None:
                trees.append(DraftTree.chain([]))
                continue
            catch_up.append(chunk)
            growing.append(_Growing(s.seq, budget, chunk.start + chunk.logits_rows[0]))
            trees.append(growing[-1])
        if growing:
            self._grow(growing, *self.execute(catch_up))
        return [self._finish(t) if isinstance(t, _Growing) else t for t in trees]

    def _catch_up(self, s: ScheduledSeq, budget: int) -> SeqChunk | None:
        """The chunk that brings the draft cache up to the sequence's last token, whose logits row is the root's
        (None: no proposal). Chain drafts the target accepted are reused, not recomputed."""
        state = self._state.setdefault(s.seq, _CacheState())
        if s.seq.num_computed < state.computed:  # preempted: its blocks (and our K/V) are gone
            state.computed, state.written = s.seq.num_computed, []
        if budget == 0:
            return None
        tokens = s.seq.token_ids
        start = state.computed
        while (start - state.computed < len(state.written) and start < len(tokens) - 1
               and state.written[start - state.computed] == tokens[start]):
            start += 1
        state.computed, state.written = len(tokens), []
        return SeqChunk(s.seq.block_table, start, tokens[start:], logits_rows=[len(tokens) - 1 - start])

    def execute(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's logits at the chunks' logits rows, and per row any state its children need (none here)."""
        return self.runner.execute(chunks), None

    def _grow(self, growing: list[_Growing], logits: torch.Tensor, states: torch.Tensor | None) -> None:
        """Expand every tree level by level; `logits` (and `states`) rows are the draft's outputs at each tree's
        frontier. A tree keeps its best `budget` nodes by cumulative log q, which only decreases from parent to
        child, so those nodes lie at most `budget` deep with at most `budget` per level and per parent: a small
        budget (many requests) grows only that much of the shape, and keeps the same nodes."""
        for level in range(self.shape.num_levels):
            width = self.shape.branching[level] if self.shape.branching is not None else self.shape.top_k
            expanding = [(g, node) for g in growing for node in g.frontier]  # in logits-row order
            for g in growing:
                g.frontier = []
            widths = [min(width, g.budget) for g, _ in expanding]
            for row, ((g, node), children) in enumerate(zip(expanding, self._children(logits, expanding, widths))):
                if states is not None:
                    g.states[node] = states[row]
                g.frontier += [g.add(node, token, logq, q) for token, logq, q in children]
            for g in growing:
                if self.shape.branching is None:  # dynamic: the best top_k of this level go on
                    g.frontier = sorted(g.frontier, key=lambda i: -g.scores[i])[:min(self.shape.top_k, g.budget)]
                if level + 1 >= g.budget:
                    g.frontier = []
            live = [g for g in growing if g.frontier]
            if level == self.shape.num_levels - 1 or not live:
                return
            logits, states = self.execute([self._frontier_chunk(g) for g in live])
            growing = live

    def _children(self, logits: torch.Tensor, expanding: list[tuple[_Growing, int]],
                  widths: list[int]) -> list[list[tuple[int, float, torch.Tensor | None]]]:
        """(token, log q, q or None) of each expanded node's children: its top `widths[row]` tokens under the
        draft distribution q (the request's temperature applied), or, for a sampled chain, one token drawn from
        q. Rows that need nothing per request (no penalties or processors, not a sampled draw) go through one
        batched top-k over the drafter's own columns; the others are processed one by one."""
        children: list = [None] * len(expanding)
        batched = []
        for row, (g, node) in enumerate(expanding):
            p = g.seq.params
            if p.processes_logits or (widths[row] == 1 and not p.greedy):
                children[row] = self._children_of_row(g, node, logits[row], widths[row])
            else:
                batched.append(row)
        if batched:
            params = [expanding[row][0].seq.params for row in batched]
            temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
            rows = torch.tensor(batched, device=logits.device)
            top = torch.topk(torch.log_softmax(logits[rows] / temps[:, None], dim=-1), max(widths[r] for r in batched))
            tokens = top.indices if self.vocab is None else self.vocab[top.indices]
            for row, logqs, ids in zip(batched, top.values.tolist(), tokens.tolist()):
                children[row] = [(token, logq, None) for token, logq in zip(ids, logqs)][:widths[row]]
        return children

    def _children_of_row(self, g: _Growing, node: int, raw: torch.Tensor,
                         width: int) -> list[tuple[int, float, torch.Tensor | None]]:
        seq = g.seq
        if self.vocab is not None:  # over the whole vocabulary: tokens the drafter never proposes get -inf
            raw = raw.new_full((self.vocab_size,), float("-inf")).index_copy_(0, self.vocab, raw)
        processed = processed_logits(raw, seq, g.paths[node])
        if width == 1 and not seq.params.greedy:
            q = target_probs(processed, seq)
            token = draw(q, seq.generator or self.sampler.generator)
            return [(token, float(torch.log(q[token])), q)]
        logq = torch.log_softmax(processed if seq.params.greedy else processed / seq.params.temperature, dim=-1)
        top = torch.topk(logq, width)
        return [(token, lp, None) for lp, token in zip(top.values.tolist(), top.indices.tolist())]

    def _frontier_chunk(self, g: _Growing) -> SeqChunk:
        """Run the frontier through the draft model. A chain appends the new node after its cached ancestors;
        a tree re-runs every expanded node (written at root + 1, root + 2, ...) so that each sees exactly its
        ancestors."""
        seq = g.seq
        if self.shape.is_chain:
            (node,) = g.frontier
            pos = g.root_pos + node
            self._state[seq].written.append(g.tokens[node - 1])
            return SeqChunk(seq.block_table, pos, [g.tokens[node - 1]], logits_rows=[0])
        g.expanded += g.frontier
        index = {node: i for i, node in enumerate(g.expanded, start=1)}
        parents = [index.get(g.parents[n - 1], 0) for n in g.expanded]
        mask, offsets = chunk_layout(1, parents)
        depths = offsets[1:]
        return SeqChunk(seq.block_table, g.root_pos + 1, [g.tokens[n - 1] for n in g.expanded],
                        logits_rows=[index[n] - 1 for n in g.frontier],
                        positions=[g.root_pos + d for d in depths], tree_mask=mask[1:, 1:])

    def _finish(self, g: _Growing) -> DraftTree:
        """Keep the best `budget` nodes by cumulative log q (all of a static tree that fits), parents first."""
        keep = min(g.budget, self.shape.total_tokens if self.shape.branching is None else len(g.tokens))
        if keep >= len(g.tokens):
            return DraftTree(g.tokens, g.parents, g.q)
        best = sorted(range(1, len(g.tokens) + 1), key=lambda i: (-g.scores[i], i))[:keep]
        kept = sorted(best)
        index = {node: i for i, node in enumerate(kept, start=1)}
        return DraftTree([g.tokens[n - 1] for n in kept], [index.get(g.parents[n - 1], 0) for n in kept],
                         [g.q[n - 1] for n in kept])
