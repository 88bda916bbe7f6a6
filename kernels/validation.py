"""Argument checks shared by the reference and the Triton implementations.

They look at shapes, dtypes and devices only, never at tensor values, so they cost no device synchronisation.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        _fail(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        _fail(f"k_cache/v_cache must share one of {FLOAT_DTYPES}, got {k_cache.dtype} and {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        _fail(f"k_cache is on {k_cache.device} but v_cache is on {v_cache.device}")


def _check_int_vector(
    name: str, t: torch.Tensor, length: int | None, dtypes: tuple[torch.dtype, ...], device: torch.device
) -> None:
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"[{length}]" if length is not None else "1-D"
        _fail(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        _fail(f"{name} is on {t.device} but the cache is on {device}")


def check_tree_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    tree_mask: torch.Tensor | None,
    out: torch.Tensor | None,
    context_mask: torch.Tensor | None = None,
) -> None:
    """Raise ValueError unless the arguments follow the `tree_attention` contract (docs/kernel.md)."""
    _check_cache_pair(k_cache, v_cache)
    if q.dim() != 3:
        _fail(f"q must be [num_tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        _fail(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    if q.device != k_cache.device:
        _fail(f"q is on {q.device} but the cache is on {k_cache.device}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        _fail(f"q head_dim {head_dim} differs from the cache head_dim {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads != 0:
        _fail(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dim() != 2:
        _fail(f"block_tables must be [num_seqs, max_blocks], got shape {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32:
        _fail(f"block_tables must have dtype torch.int32, got {block_tables.dtype}")
    if block_tables.device != k_cache.device:
        _fail(f"block_tables is on {block_tables.device} but the cache is on {k_cache.device}")
    num_seqs = block_tables.shape[0]
    _check_int_vector("context_lens", context_lens, num_seqs, (torch.int32,), k_cache.device)
    _check_int_vector("cu_seqlens_q", cu_seqlens_q, num_seqs + 1, (torch.int32,), k_cache.device)
    masks = (
        ("tree_mask", tree_mask, "num_tokens", num_tokens, "max_q"),
        ("context_mask", context_mask, "num_seqs", num_seqs, "max_context_len"),
    )
    for name, mask, rows, num_rows, columns in masks:
        if mask is None:
            continue
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != num_rows:
            _fail(
                f"{name} must be a bool [{rows}={num_rows}, {columns}] tensor, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        if mask.device != k_cache.device:
            _fail(f"{name} is on {mask.device} but the cache is on {k_cache.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        _fail(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )


def check_tree_attention_values(
    cu_seqlens_q: list[int],
    context_lens: list[int],
    num_tokens: int,
    capacity: int,
    tree_mask_width: int | None,
    context_mask_width: int | None = None,
) -> None:
    """Value checks for callers that already hold the metadata on the host (the reference does)."""
    if cu_seqlens_q[0] != 0 or cu_seqlens_q[-1] != num_tokens:
        _fail(f"cu_seqlens_q must start at 0 and end at num_tokens={num_tokens}, got {cu_seqlens_q}")
    for b, (start, end, ctx) in enumerate(zip(cu_seqlens_q, cu_seqlens_q[1:], context_lens)):
        if end < start:
            _fail(f"cu_seqlens_q must be non-decreasing, got {cu_seqlens_q}")
        if ctx < 0 or ctx + end - start > capacity:
            _fail(
                f"sequence {b}: context_len {ctx} + {end - start} new tokens does not fit its block table "
                f"({capacity} slots)"
            )
        if tree_mask_width is not None and end - start > tree_mask_width:
            _fail(f"sequence {b} has {end - start} new tokens but tree_mask has only {tree_mask_width} columns")
        if context_mask_width is not None and ctx > context_mask_width:
            _fail(f"sequence {b} has a context of {ctx} tokens but context_mask has only {context_mask_width} columns")


def check_write_kv_args(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Raise ValueError unless `write_kv`'s arguments are consistent."""
    _check_cache_pair(k_cache, v_cache)
    row_shape = tuple(k_cache.shape[2:])
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != row_shape:
            _fail(f"{name} must be [num_tokens, {row_shape[0]}, {row_shape[1]}], got shape {tuple(t.shape)}")
        if t.dtype != k_cache.dtype:
            _fail(f"{name} dtype {t.dtype} differs from the cache dtype {k_cache.dtype}")
        if t.device != k_cache.device:
            _fail(f"{name} is on {t.device} but the cache is on {k_cache.device}")
    if value.shape[0] != key.shape[0]:
        _fail(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    _check_int_vector("slot_mapping", slot_mapping, key.shape[0], INDEX_DTYPES, k_cache.device)


def check_move_kv_args(
    k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor
) -> None:
    """Raise ValueError unless `move_kv`'s arguments are consistent."""
    _check_cache_pair(k_cache, v_cache)
    _check_int_vector("src_slots", src_slots, None, INDEX_DTYPES, k_cache.device)
    _check_int_vector("dst_slots", dst_slots, src_slots.shape[0], INDEX_DTYPES, k_cache.device)
