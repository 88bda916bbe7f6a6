"""Candidate-tree metadata, built once per step: attention masks, depths (positions) and children lists.

A tree is given by `parents` over nodes 1..N (node 0 is the root, the last committed token; `parents[i - 1] < i`).
"""

from __future__ import annotations

import torch


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of the root (0) and of every node."""
    depths = [0]
    for p in parents:
        depths.append(depths[p] + 1)
    return depths


def tree_children(parents: list[int]) -> list[list[int]]:
    """Children of the root and of every node, in candidate order."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents, start=1):
        children[p].append(i)
    return children


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """bool `[N+1, N+1]` over root + nodes: row i sees j iff j is i or one of its ancestors (EAGLE's tree mask)."""
    n = len(parents) + 1
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    for i, p in enumerate(parents, start=1):
        mask[i] |= mask[p]
    return mask


def chunk_layout(num_prefix: int, parents: list[int], num_pad: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Mask and position offsets for a chunk `prefix tokens (the last one is the root) + tree nodes + pads`.

    The prefix is causal, every node sees the whole prefix and its own ancestors, a pad row sees the prefix and
    itself. Offsets are added to the position of the chunk's first token: prefix tokens count up, a node sits
    at root + depth (siblings share a position), pads at root + 1.
    """
    r = num_prefix - 1  # the root's row
    n_tree = len(parents) + 1
    n = num_prefix + len(parents) + num_pad
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:num_prefix, :num_prefix] = torch.ones(num_prefix, num_prefix, dtype=torch.bool).tril()
    mask[r : r + n_tree, r : r + n_tree] = ancestor_mask(parents)
    mask[num_prefix:, :r] = True
    for j in range(r + n_tree, n):
        mask[j, r] = mask[j, j] = True
    offsets = list(range(r)) + [r + d for d in tree_depths(parents)] + [r + 1] * num_pad
    return mask, offsets
