"""PyTorch implementations of the three kernels: the test oracle's twin, and the production path on CPU.

`tree_attention` gathers each sequence's K/V through its block table and calls
`torch.nn.functional.scaled_dot_product_attention`, with no mask whenever every query may see every key
(a single query, a bidirectional block), `is_causal` for a causal block with no context, and an explicit
boolean mask otherwise. fp16/bf16 are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import (check_move_kv_args, check_tree_attention_args, check_tree_attention_values,
                         check_write_kv_args)


def _visibility(context_len: int, num_new: int, tree_rows: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for one sequence's queries over its `context_len + num_new` keys."""
    if tree_rows is None:
        if num_new == 1:
            return None, False
        if context_len == 0:
            return None, True
        return torch.ones(num_new, context_len + num_new, dtype=torch.bool, device=device).tril(context_len), False
    if bool(tree_rows.all()):
        return None, False
    if context_len == 0:
        return tree_rows, False
    mask = torch.ones(num_new, context_len + num_new, dtype=torch.bool, device=device)
    mask[:, context_len:] = tree_rows
    return mask, False


def _sequence_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                 num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `num_keys` keys and values as [1, Hkv, num_keys, D] tensors.

    Consecutive blocks are sliced (a view); otherwise they are gathered. Long contexts are memory-bound on CPU,
    so skipping the copy halves their time.
    """
    if blocks.shape[0] >= 4 and bool((blocks.diff() == 1).all()):
        first = int(blocks[0])
        keys, values = k_cache[first: first + blocks.shape[0]], v_cache[first: first + blocks.shape[0]]
    else:
        keys, values = k_cache.index_select(0, blocks), v_cache.index_select(0, blocks)
    # 4-D [1, H, L, D]: SDPA's fused CPU kernel does not take 3-D inputs (5x slower math path).
    return keys.flatten(0, 1)[None, :num_keys].transpose(1, 2), values.flatten(0, 1)[None, :num_keys].transpose(1, 2)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged attention of packed new tokens over their sequences' cached context plus a tree/causal mask.

    Contract in design.md ("The kernel contract"); `out`, if given, receives the result.
    """
    check_tree_attention_args(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tree_mask, out)
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    check_tree_attention_values(cu, ctx_lens, q.shape[0], block_tables.shape[1] * block_size,
                                None if tree_mask is None else tree_mask.shape[1])
    compute_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    num_seqs = len(ctx_lens)
    if out is None and num_seqs > 1:
        out = torch.empty_like(q)
    for b, ctx in enumerate(ctx_lens):
        start, end = cu[b], cu[b + 1]
        num_new = end - start
        if num_new == 0:
            continue
        num_keys = ctx + num_new
        keys, values = _sequence_kv(k_cache, v_cache, block_tables[b, : -(-num_keys // block_size)], num_keys)
        mask, causal = _visibility(ctx, num_new, None if tree_mask is None else tree_mask[start:end, :num_new],
                                   q.device)
        o = F.scaled_dot_product_attention(
            q[None, start:end].transpose(1, 2).to(compute_dtype), keys.to(compute_dtype), values.to(compute_dtype),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        if out is None:  # one sequence: hand back SDPA's result without another copy
            return o.to(q.dtype)
        out[start:end] = o
    return torch.empty_like(q) if out is None else out


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """In place: token t's key/value go to flat slot `slot_mapping[t]` (block * block_size + offset); < 0 skips."""
    check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    skip = slots < 0
    if bool(skip.any()):
        keep = ~skip
        slots, key, value = slots[keep], key[keep], value[keep]
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)
    else:
        index = (slots // k_cache.shape[1], slots % k_cache.shape[1])
        k_cache[index] = key
        v_cache[index] = value


def move_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In place: slot `dst_slots[i]` receives what slot `src_slots[i]` held before the call.

    All sources are read before anything is written, so sources and destinations may overlap in any way;
    slots must be valid (non-negative) and destinations distinct.
    """
    check_move_kv_args(k_cache, v_cache, src_slots, dst_slots)
    block_size = k_cache.shape[1]
    src, dst = src_slots.long(), dst_slots.long()
    src_index, dst_index = (src // block_size, src % block_size), (dst // block_size, dst % block_size)
    for cache in (k_cache, v_cache):
        cache[dst_index] = cache[src_index]
