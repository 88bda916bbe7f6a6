"""Prompt lookup: the continuation of the latest earlier occurrence of a sequence's last n tokens.

`NgramIndex` finds it for one growing token list (the `ngram` drafter's proposal). `PromptLookup` adds such a chain
to another drafter's trees: text that repeats its context (a summary quoting its source, code edited in place, an
answer restating the question) continues an earlier occurrence of its last few tokens, often for more tokens than a
small drafter's tree is deep. The chain and the drafter's tree are merged (a chain token equal to a drafter's node
is that node) and the nodes ranked by how likely each is to be accepted, so that the first n are still the best tree
of n nodes:

- a drafter's node by its score (cumulative log q, `DraftTree.scores`; 0 where the drafter gives none: its nodes
  first);
- the chain's k-th token by k log a, a the share of the chain's own tokens (those no drafter's node repeats) the
  target accepted, each after its predecessor was, in this sequence and in all of them: (accepted + `prior` a_all)
  / (tried + `prior`), the counts decayed by `decay` per verified chain (`decay_all` over all sequences, which
  start from `start`);
- a merged node by the larger of the two.

Where chains hold (a summary quoting its source), they rank first and run deeper than the drafter; where they do not
(arithmetic repeats its numbers with other continuations), the drafter's nodes keep the budget. Only trees of
deterministic drafts are changed: a node drawn from a distribution q must keep its q for lossless sampling, which a
chain token merged into it would not have.

| threshold | value | meaning |
|---|---|---|
| `decay` | 0.9 | weight of a sequence's past chains, per verified chain |
| `decay_all` | 0.99 | the same over all sequences |
| `prior` | 4 | chain tokens' worth of the all-sequence share in a sequence's own |
| `start` | 1 of 2 | the all-sequence counts before any chain is verified (a = 0.5) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .drafter import DraftTree
from .request import PerSequence, Sequence


class NgramIndex:
    """The latest position each n-gram (n_min..n_max tokens) of a growing token list ends at, all but its last
    token indexed: a lookup costs a few dict reads, not a scan of the context."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.indexed = 0  # n-grams ending at positions < indexed are in `ends`
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> the latest position it ends at

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest of `tokens`' suffixes of n_max
        down to n_min tokens. `tokens` only grows between calls (a shorter list starts the index over)."""
        if len(tokens) < self.indexed + 1:
            self.indexed, self.ends = 0, {}
        for end in range(self.indexed, len(tokens) - 1):  # the last token's continuation is not known yet
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self.ends[tuple(tokens[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            found = self.ends.get(tuple(tokens[-n:]))
            if found is not None:
                return tokens[found + 1 : found + 1 + k]
        return []


def merge_chain(
    tree: DraftTree, chain: list[int], log_a: float, budget: int
) -> tuple[DraftTree, list[tuple[int, bool]]]:
    """`tree` and `chain` (from the root) merged, ranked (the module's docstring; the chain's k-th token scores
    k `log_a`), the best `budget` nodes kept; and the chain's nodes among them, in order, each with whether it is the
    chain's own (no drafter's node). A node never outranks its parent (scores fall along both), and ties keep the
    earlier node first, so parents precede their children."""
    tokens, parents = list(tree.tokens), list(tree.parents)
    scores = list(tree.scores) if tree.scores is not None else [0.0] * len(tokens)
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens), start=1)}  # (parent, token) -> node
    path, at = [], 0
    for k, token in enumerate(chain, start=1):
        node = child.get((at, token))
        if node is None:
            tokens.append(token)
            parents.append(at)
            scores.append(k * log_a)
            node = child[(at, token)] = len(tokens)
        else:
            scores[node - 1] = max(scores[node - 1], k * log_a)
        path.append(node)
        at = node
    kept = sorted(range(1, len(tokens) + 1), key=lambda i: (-scores[i - 1], i))[:budget]
    index = {node: i for i, node in enumerate(kept, start=1)}
    merged = DraftTree(
        [tokens[n - 1] for n in kept],
        [index[parents[n - 1]] if parents[n - 1] else 0 for n in kept],
        [None] * len(kept),
        [scores[n - 1] for n in kept],
    )
    return merged, [(index[n], n > len(tree.tokens)) for n in path if n in index]


@dataclass(frozen=True)
class Thresholds:
    """The merge's numbers (the table above)."""

    decay: float = 0.9
    decay_all: float = 0.99
    prior: float = 4.0
    start: tuple[float, float] = (1.0, 2.0)  # (accepted, tried)


THRESHOLDS = Thresholds()


@dataclass
class _SeqState:
    index: NgramIndex
    chain_nodes: list[tuple[int, bool]] = field(default_factory=list)  # the last tree's chain: (node, its own?)
    accepted: float = 0.0  # decayed own chain tokens accepted ...
    tried: float = 0.0  # ... of those verified after an accepted predecessor


class PromptLookup:
    """`speculative_config.lookup`: each sequence's lookup chain of up to `tokens` tokens, merged into its tree
    (`merge_chain`); the decoder reports each verified tree's accepted nodes to `record`."""

    def __init__(self, tokens: int, ngram_min: int, ngram_max: int, thresholds: Thresholds = THRESHOLDS):
        self.tokens, self.ngram_min, self.ngram_max = tokens, ngram_min, ngram_max
        self.th = thresholds
        self.accepted, self.tried = thresholds.start  # over all sequences
        self._seqs = PerSequence(lambda: _SeqState(NgramIndex(ngram_min, ngram_max)))

    def acceptance(self, seq: Sequence) -> float:
        """a: the share of chain tokens accepted, this sequence's blended with all sequences'."""
        state = self._seqs.get(seq)
        overall = self.accepted / self.tried
        if state is None:
            return overall
        return (state.accepted + self.th.prior * overall) / (state.tried + self.th.prior)

    def merge(self, seqs: list[Sequence], budgets: list[int], trees: list[DraftTree]) -> list[DraftTree]:
        """Each tree with its sequence's chain merged in, within its budget; trees with sampled drafts as they are."""
        out = []
        for seq, budget, tree in zip(seqs, budgets, trees):
            state = self._seqs[seq]
            state.chain_nodes = []
            chain = state.index.lookup(seq.token_ids, min(self.tokens, budget)) if budget else []
            if chain and all(q is None for q in tree.q):
                tree, state.chain_nodes = merge_chain(tree, chain, math.log(max(self.acceptance(seq), 1e-6)), budget)
            out.append(tree)
        return out

    def record(self, seq: Sequence, accepted: list[int]) -> None:
        """A verified tree's accepted nodes (root to leaf): how far along its chain the target went."""
        state = self._seqs.get(seq)
        if state is None or not state.chain_nodes:
            return
        taken = tried = 0
        for depth, (node, own) in enumerate(state.chain_nodes):
            tried += own
            if depth >= len(accepted) or accepted[depth] != node:
                break
            taken += own
        state.chain_nodes = []
        if tried:  # the chain told something a drafter's node did not
            state.accepted = self.th.decay * state.accepted + taken
            state.tried = self.th.decay * state.tried + tried
            self.accepted = self.th.decay_all * self.accepted + taken
            self.tried = self.th.decay_all * self.tried + tried
