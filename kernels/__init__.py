"""leapserve.kernels: paged tree attention and KV-cache row copies, in Triton and in PyTorch.

Each call picks its implementation from `LEAPSERVE_KERNEL_BACKEND`, read at call time:

- `auto` (default): Triton for CUDA tensors, the PyTorch reference otherwise;
- `triton`: always Triton (on CPU this needs `TRITON_INTERPRET=1` set before the first Triton call; tests only);
- `reference`: always the PyTorch reference.

Triton is imported on first use, so this package imports quickly and works without it.
"""

from __future__ import annotations

import torch

from .attention_step import AttentionStep
from .backend import backend_for, implementation

__all__ = ["tree_attention", "write_kv", "move_kv", "backend_for", "AttentionStep"]


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention of packed new tokens over their sequences' cached context plus a tree/causal mask.

    The contract is in docs/kernel.md; `out`, if given, receives the result and is returned.
    `context_mask`, bool `[B, W]` with `W >= max(context_lens)`, hides context position p of
    sequence b unless `context_mask[b, p]` (None: every context position is visible). The `padded` speculative
    layout uses it for the vanilla baseline's masked KV slots; hidden slots must still hold finite values (any
    slot written by an earlier step does).
    """
    impl = implementation(q.device, "tree_attention_triton")
    return impl.tree_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        cu_seqlens_q,
        tree_mask,
        scale,
        out=out,
        context_mask=context_mask,
    )


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """In place: token t's key/value [T, Hkv, D] go to flat slot `slot_mapping[t]` (= block * block_size + offset).

    Negative slots are skipped; `slot_mapping` is int32 or int64 on the cache's device; key/value have the cache's
    dtype; non-negative slots must be distinct.
    """
    implementation(k_cache.device, "cache_ops").write_kv(key, value, k_cache, v_cache, slot_mapping)


def move_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In place: slot `dst_slots[i]` receives what slot `src_slots[i]` held before the call (flat slot numbers).

    Every source is read before any destination is written, so overlapping ranges (compacting an accepted tree
    path towards the front) are fine; slots must be non-negative and destinations distinct.
    """
    implementation(k_cache.device, "cache_ops").move_kv(k_cache, v_cache, src_slots, dst_slots)
