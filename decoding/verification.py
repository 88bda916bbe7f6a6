"""Verification of a candidate tree against the target's logits: greedy, or lossless sampling.

Greedy: walk from the root while the target's argmax is a child; the first argmax that is not is the bonus.
Sampling (SpecInfer's recursive rejection): at each node visit the children in order; accept child x drawn
from q with probability min(1, p(x) / q(x)), otherwise set p <- norm(max(p - q, 0)) and try the next sibling
(q is one-hot on x for a deterministically chosen child); when all are rejected, the bonus token is drawn from
the residual p. A chain is the tree with one child per node (Leviathan et al.); the output is distributed as p.
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
