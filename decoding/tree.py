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


def _ancestor_rows(parents: list[int]) -> list[list[bool]]:
    """`ancestor_mask` as Python rows."""
    rows = [[True] + [False] * len(parents)]
    for i, p in enumerate(parents, start=1):
        rows.append(rows[p].copy())
        rows[i][i] = True
    return rows


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """bool `[N+1, N+1]` over root + nodes: row i sees j iff j is i or one of its ancestors (EAGLE's tree mask)."""
    return torch.tensor(_ancestor_rows(parents), dtype=torch.bool)


def chunk_layout(num_prefix: int, parents: list[int], num_pad: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Mask and position offsets for a chunk `prefix tokens (the last one is the root) + tree nodes + pads`.

    The prefix is causal, every node sees the whole prefix and its own ancestors, a pad row sees the prefix and
    itself. Offsets are added to the position of the chunk's first token: prefix tokens count up, a node sits
    at root + depth (siblings share a position), pads at root + 1.
    """
    r = num_prefix - 1  # the root's row
    n_tree = len(parents) + 1
    n = num_prefix + len(parents) + num_pad
    # the rows from the root on as Python lists, then one tensor, not a torch op per node; a prefix (long where a
    # prompt's last chunk is verified with a tree) is filled by torch
    tail = [row + [False] * num_pad for row in _ancestor_rows(parents)]
    for j in range(num_pad):  # a pad sees the root and itself
        tail.append([True] + [False] * (n_tree - 1 + num_pad))
        tail[-1][n_tree + j] = True
    if r == 0:
        mask = torch.tensor(tail, dtype=torch.bool)
    else:
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:num_prefix, :num_prefix] = torch.ones(num_prefix, num_prefix, dtype=torch.bool).tril()
        mask[num_prefix:, :r] = True
        mask[r:, r:] = torch.tensor(tail, dtype=torch.bool)
    offsets = list(range(r)) + [r + d for d in tree_depths(parents)] + [r + 1] * num_pad
    return mask, offsets
