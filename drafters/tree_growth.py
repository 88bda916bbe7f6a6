"""EAGLE-2 tree growth for the model drafters (`draft_model`, `fspad`), which own a `TreeGrower` each.

The drafter supplies two things: a catch-up chunk per sequence (bringing its cache up to the sequence, whose logits
row is the root's; its context holes, cache ranges the drafter never wrote, hold for the whole tree) and its one
model forward (`execute`). Trees then grow level by level: each frontier node's
children are its top-b tokens under the draft distribution q, scored by cumulative log q. A static tree keeps
every node; a dynamic one keeps `top_k` frontier nodes per level and the best `total_tokens` nodes overall. A chain
(branching 1) under sampling draws each token from q (and records q for lossless verification) instead of taking
the argmax. A drafter whose forward also returns a state per logits row (FSPAD's predicted feature) gets, for each
node it runs, its parent's state as input, in `SeqChunk.extra["features"]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.request import Sequence
from leapserve.decoding.runner import SeqChunk
from leapserve.decoding.sampler import Sampler, draw, processed_logits, target_probs
from leapserve.decoding.scheduler import ScheduledSeq
from leapserve.decoding.tree import chunk_layout

# (scheduled sequence, budget) -> the chunk whose `logits_rows[0]` is the root's row (None: no proposal)
CatchUp = Callable[[ScheduledSeq, int], SeqChunk | None]
# the drafter's one forward: logits `[rows, V_draft]` at the chunks' logits rows, and a state per row (or None)
Execute = Callable[[list[SeqChunk]], tuple[torch.Tensor, torch.Tensor | None]]
Child = tuple[int, float, torch.Tensor | None]  # (token, log q, q or None)


@dataclass
class TreeShape:
    """Static branching per depth (a chain is [1] * k), or an EAGLE-2 dynamic tree (`depth` levels, `top_k`
    frontier and children, the best `total_tokens` by cumulative log q)."""

    branching: list[int] | None = None
    depth: int = 0
    top_k: int = 0
    total_tokens: int = 0

    @classmethod
    def from_config(cls, spec: SpeculativeConfig) -> TreeShape:
        if spec.tree is None:
            return cls(branching=[1] * spec.num_speculative_tokens)
        if isinstance(spec.tree, list):
            return cls(branching=list(spec.tree))
        t = {"depth": 5, "top_k": 4, "total_tokens": 16, **spec.tree}
        return cls(depth=t["depth"], top_k=t["top_k"], total_tokens=t["total_tokens"])

    @property
    def is_chain(self) -> bool:
        return self.branching is not None and all(b == 1 for b in self.branching)

    @property
    def num_levels(self) -> int:
        return len(self.branching) if self.branching is not None else self.depth

    @property
    def max_nodes(self) -> int:
        if self.branching is None:
            return self.total_tokens
        return sum(math.prod(self.branching[: d + 1]) for d in range(len(self.branching)))

    @property
    def max_expanded(self) -> int:
        """Nodes a model drafter runs through itself (all but the last level's) in one proposal."""
        if self.branching is None:
            return self.top_k * (self.depth - 1)
        return sum(math.prod(self.branching[: d + 1]) for d in range(len(self.branching) - 1))

    @property
    def lookahead(self) -> int:
        """Cache slots past a sequence's committed tokens that one proposal may write."""
        return max(self.max_nodes, self.max_expanded)


@dataclass
class _Growing:
    """One sequence's tree while it grows; node 0 is the root."""

    seq: Sequence
    budget: int
    root_pos: int
    holes: list[tuple[int, int]]  # the drafter's cache ranges its attention skips (the catch-up chunk's)
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list[torch.Tensor | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=lambda: [0.0])
    paths: list[list[int]] = field(default_factory=lambda: [[]])  # tokens from the root's child down to node i
    expanded: list[int] = field(default_factory=list)  # a tree's nodes run through the drafter, in cache order
    frontier: list[int] = field(default_factory=lambda: [0])
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # per run node: the drafter's state output

    def add(self, parent: int, token: int, logq: float, q: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.q.append(q)
        self.scores.append(self.scores[parent] + logq)
        self.paths.append(self.paths[parent] + [token])
        return len(self.tokens)


class TreeGrower:
    """A model drafter's tree shape, and its proposals grown from the drafter's catch-up chunks and forward."""

    def __init__(
        self, spec: SpeculativeConfig, sampler: Sampler, vocab: torch.Tensor | None = None, vocab_size: int = 0
    ):
        """`vocab`: the token ids of the drafter's logit columns, out of `vocab_size` (None: all of them)."""
        self.shape = TreeShape.from_config(spec)
        self.sampler = sampler
        self.vocab, self.vocab_size = vocab, vocab_size

    def propose(
        self, scheduled: list[ScheduledSeq], budgets: list[int], catch_up: CatchUp, execute: Execute
    ) -> list[DraftTree]:
        """One tree per scheduled sequence, of at most `budgets[i]` nodes; every catch-up chunk runs in one forward."""
        growing: list[_Growing] = []
        chunks: list[SeqChunk] = []
        trees: list[DraftTree | _Growing] = []
        for s, budget in zip(scheduled, budgets):
            chunk = catch_up(s, budget)
            if chunk is None:
                trees.append(DraftTree.chain([]))
                continue
            chunks.append(chunk)
            growing.append(_Growing(s.seq, budget, chunk.start + chunk.logits_rows[0], chunk.context_holes))
            trees.append(growing[-1])
        if growing:
            self._grow(growing, *execute(chunks), execute)
        return [self._finish(t) if isinstance(t, _Growing) else t for t in trees]

    def _grow(
        self, growing: list[_Growing], logits: torch.Tensor, states: torch.Tensor | None, execute: Execute
    ) -> None:
        """Expand every tree level by level; `logits` (and `states`) rows are the drafter's outputs at each tree's
        frontier. A tree keeps its best `budget` nodes by cumulative log q, which only decreases from parent to
        child, so those nodes lie at most `budget` deep with at most `budget` per level and per parent: a small
        budget (many requests) grows only that much of the shape, and keeps the same nodes."""
        shape = self.shape
        for level in range(shape.num_levels):
            width = shape.branching[level] if shape.branching is not None else shape.top_k
            expanding = [(g, node) for g in growing for node in g.frontier]  # in logits-row order
            for g in growing:
                g.frontier = []
            widths = [min(width, g.budget) for g, _ in expanding]
            for row, ((g, node), children) in enumerate(zip(expanding, self._children(logits, expanding, widths))):
                if states is not None:
                    g.states[node] = states[row]
                g.frontier += [g.add(node, token, logq, q) for token, logq, q in children]
            for g in growing:
                if shape.branching is None:  # dynamic: the best top_k of this level go on
                    g.frontier = sorted(g.frontier, key=lambda i: -g.scores[i])[: min(shape.top_k, g.budget)]
                if level + 1 >= g.budget:
                    g.frontier = []
            live = [g for g in growing if g.frontier]
            if level == shape.num_levels - 1 or not live:
                return
            logits, states = execute([self._frontier_chunk(g) for g in live])
            growing = live

    def _children(
        self, logits: torch.Tensor, expanding: list[tuple[_Growing, int]], widths: list[int]
    ) -> list[list[Child]]:
        """The children of each expanded node: its top `widths[row]` tokens under the draft distribution q (the
        request's temperature applied), or, for a sampled chain, one token drawn from q. Rows that need nothing
        per request (no penalties or processors, not a sampled draw) go through one batched top-k over the
        drafter's own columns; the others are processed one by one."""
        children: list[list[Child]] = [[] for _ in expanding]
        batched = []
        for row, (g, node) in enumerate(expanding):
            p = g.seq.params
            if p.processes_logits or (widths[row] == 1 and not p.greedy):
                children[row] = self._children_of_row(g, node, logits[row], widths[row])
            else:
                batched.append(row)
        if batched:
            params = [expanding[row][0].seq.params for row in batched]
            if batched != list(range(len(logits))):  # some rows processed one by one
                logits = logits[torch.tensor(batched, device=logits.device)]
            if not all(p.greedy for p in params):
                temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
                logits = logits / temps[:, None]
            top = torch.topk(torch.log_softmax(logits, dim=-1), max(widths[r] for r in batched))
            tokens = top.indices if self.vocab is None else self.vocab[top.indices]
            for row, logqs, ids in zip(batched, top.values.tolist(), tokens.tolist()):
                children[row] = [(token, logq, None) for token, logq in zip(ids, logqs)][: widths[row]]
        return children

    def _children_of_row(self, g: _Growing, node: int, raw: torch.Tensor, width: int) -> list[Child]:
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
        """Run the frontier through the drafter. A chain appends the new node after its cached ancestors; a tree
        re-runs every expanded node (written at root + 1, root + 2, ...) so that each sees exactly its ancestors."""
        seq = g.seq
        if self.shape.is_chain:
            (node,) = g.frontier
            nodes = [node]
            chunk = SeqChunk(
                seq.block_table, g.root_pos + node, [g.tokens[node - 1]], logits_rows=[0], context_holes=g.holes
            )
        else:
            g.expanded += g.frontier
            nodes = g.expanded
            index = {node: i for i, node in enumerate(nodes, start=1)}
            mask, offsets = chunk_layout(1, [index.get(g.parents[n - 1], 0) for n in nodes])
            chunk = SeqChunk(
                seq.block_table,
                g.root_pos + 1,
                [g.tokens[n - 1] for n in nodes],
                logits_rows=[index[n] - 1 for n in g.frontier],
                positions=[g.root_pos + d for d in offsets[1:]],
                tree_mask=mask[1:, 1:],
                context_holes=g.holes,
            )
        if g.states:  # a recurrent drafter: each node continues from its parent's state
            chunk.extra["features"] = torch.stack([g.states[g.parents[n - 1]] for n in nodes])
        return chunk

    def _finish(self, g: _Growing) -> DraftTree:
        """Keep the best `budget` nodes by cumulative log q (all of a static tree that fits), best first: a
        parent scores at least its child and comes first on ties, so parents still precede children, and the
        first n nodes are the tree a budget of n keeps."""
        keep = min(g.budget, self.shape.total_tokens if self.shape.branching is None else len(g.tokens))
        kept = sorted(range(1, len(g.tokens) + 1), key=lambda i: (-g.scores[i], i))[:keep]
        index = {node: i for i, node in enumerate(kept, start=1)}
        return DraftTree(
            [g.tokens[n - 1] for n in kept],
            [index.get(g.parents[n - 1], 0) for n in kept],
            [g.q[n - 1] for n in kept],
            [g.scores[n] for n in kept],
        )
