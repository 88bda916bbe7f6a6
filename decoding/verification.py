"""Verification of a candidate tree against the target's logits: greedy, or lossless sampling.

Greedy: walk from the root while the target's argmax is a child; the first argmax that is not is the bonus.
Sampling (SpecInfer's recursive rejection): at each node visit the children in order; accept child x drawn
from q with probability min(1, p(x) / q(x)), otherwise set p <- norm(max(p - q, 0)) and try the next sibling
(q is one-hot on x for a deterministically chosen child); when all are rejected, the bonus token is drawn from
the residual p. A chain is the tree with one child per node (Leviathan et al.); the output is distributed as p.

Where every draft was chosen deterministically (q one-hot: top-k tree children, n-gram and fixed drafts) and the
request's probabilities do not depend on the path, sampling verification reads the host twice per sequence instead
of at every tried child: the target's probabilities at every node with children in one batched op, the children's
probabilities and one uniform per child in one transfer, the walk on the host, then the bonus draw.
"""

from __future__ import annotations

import torch

from .drafter import DraftTree
from .request import Sequence
from .sampler import Sample, Sampler, draw, plain_greedy, processed_logits, target_probs
from .tree import tree_children


def _residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    if q is None:
        r = p.clone()
        r[token] = 0.0
    else:
        r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    return r / total if total > 0 else p  # total 0 means p == q, where the child is always accepted


def verify(
    tree: DraftTree, logits: torch.Tensor, seq: Sequence, sampler: Sampler, argmax: list[int] | None = None
) -> tuple[list[int], list[Sample]]:
    """`logits` `[N+1, V]`: the target's raw logits at the root and at every node; `argmax`, where given, their
    rows' argmax (`sampler.row_argmax`), which a `plain_greedy` request takes instead of one argmax per node.

    Returns the accepted nodes (root to leaf, 1-based) and the committed samples: one per accepted node plus
    the bonus token. Raises SequenceError if the request's logits processors fail.
    """
    children = tree_children(tree.parents)
    generator = seq.generator or sampler.generator
    k = seq.params.logprobs
    if not (seq.params.greedy or seq.params.processes_logits) and all(q is None for q in tree.q):
        path, committed = _verify_chosen_drafts(tree, children, logits, seq, generator)
        return path, [
            Sample(t, None if k is None else sampler.token_logprobs(logits[n], t, k))
            for n, t in zip([0, *path], committed)
        ]
    node = 0
    accepted: list[int] = []
    tokens: list[int] = []
    samples: list[Sample] = []
    fast = argmax if argmax is not None and plain_greedy(seq) else None  # the rows' argmax is the greedy token
    while True:
        raw = logits[node]
        nxt = None
        if seq.params.greedy:
            token = fast[node] if fast is not None else int(torch.argmax(processed_logits(raw, seq, tokens)))
            nxt = next((c for c in children[node] if tree.tokens[c - 1] == token), None)
        else:
            p = target_probs(processed_logits(raw, seq, tokens), seq)
            for c in children[node]:
                x, q = tree.tokens[c - 1], tree.q[c - 1]
                qx = 1.0 if q is None else float(q[x])
                if float(torch.rand(1, generator=generator, device=p.device)) * qx < float(p[x]):
                    nxt, token = c, x
                    break
                p = _residual(p, q, x)
            if nxt is None:
                token = draw(p, generator)
        samples.append(Sample(token, None if k is None else sampler.token_logprobs(raw, token, k)))
        tokens.append(token)
        if nxt is None:
            return accepted, samples
        accepted.append(nxt)
        node = nxt


def _verify_chosen_drafts(
    tree: DraftTree, children: list[list[int]], logits: torch.Tensor, seq: Sequence, generator: torch.Generator | None
) -> tuple[list[int], list[int]]:
    """Recursive rejection with every q one-hot, read from the host once: the accepted nodes and the committed tokens
    (the accepted nodes' and the bonus). Rejecting child x leaves p with p(x) = 0, renormalized: the next sibling y
    is accepted with probability p(y) / (1 - the rejected siblings' mass)."""
    inner = [n for n, c in enumerate(children) if c]
    edges = [c for n in inner for c in children[n]]
    probs = target_probs(logits[inner], seq) if inner else logits[:0]  # [I, V]
    row_of = {n: i for i, n in enumerate(inner)}
    p_child = probs[[row_of[tree.parents[c - 1]] for c in edges], [tree.tokens[c - 1] for c in edges]]
    u = torch.rand(len(edges), generator=generator, device=probs.device)
    p_list, u_list = torch.stack((p_child.double(), u.double())).tolist()
    edge = {c: i for i, c in enumerate(edges)}
    node, accepted, tokens = 0, [], []
    while True:
        rejected, zeroed, nxt = 0.0, [], None
        for c in children[node]:
            px = p_list[edge[c]]
            left = 1.0 - rejected
            if u_list[edge[c]] < (px / left if left > 0 else px):
                nxt = c
                break
            rejected += px
            zeroed.append(tree.tokens[c - 1])
        if nxt is None:
            break
        accepted.append(nxt)
        tokens.append(tree.tokens[nxt - 1])
        node = nxt
    p = probs[row_of[node]] if node in row_of else target_probs(logits[node], seq)
    if zeroed:
        r = p.clone()
        r[zeroed] = 0.0
        p = torch.where(r.sum() > 0, r, p)  # all of p on rejected children (p == q): p itself, as `_residual`
    tokens.append(draw(p, generator))
    return accepted, tokens
