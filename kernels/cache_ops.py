"""Triton paged-KV-cache row copies: `write_kv` (new tokens -> slots) and `move_kv` (slots -> slots).

Both are one kernel that copies [num_kv_heads, head_dim] rows between two "paged" tensors
[num_pages, page_size, num_kv_heads, head_dim] (a [T, Hkv, D] tensor is one with page_size 1). Rows are copied
as raw bits (integers of the element's width), so any dtype is exact, bf16 in the interpreter included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import check_move_kv_args, check_write_kv_args

_BITS_DTYPE = {2: torch.int16, 4: torch.int32}


@triton.jit
def _copy_kv_rows_kernel(
    src_k_ptr,
    src_v_ptr,
    dst_k_ptr,
    dst_v_ptr,
    src_rows_ptr,
    dst_rows_ptr,
    src_k_page,
    src_k_slot,
    src_k_head,
    src_v_page,
    src_v_slot,
    src_v_head,
    dst_k_page,
    dst_k_slot,
    dst_k_head,
    dst_v_page,
    dst_v_slot,
    dst_v_head,
    SRC_PAGE_SIZE: tl.constexpr,
    DST_PAGE_SIZE: tl.constexpr,
    HAS_SRC_ROWS: tl.constexpr,
    HAS_DST_ROWS: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row i: dst[dst_rows[i]] = src[src_rows[i]] (row index i where a row array is absent); negative rows skip."""
    i = tl.program_id(0).to(tl.int64)
    src_row = tl.load(src_rows_ptr + i).to(tl.int64) if HAS_SRC_ROWS else i
    dst_row = tl.load(dst_rows_ptr + i).to(tl.int64) if HAS_DST_ROWS else i
    if (src_row < 0) | (dst_row < 0):
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src_page, src_slot = src_row // SRC_PAGE_SIZE, src_row % SRC_PAGE_SIZE
    dst_page, dst_slot = dst_row // DST_PAGE_SIZE, dst_row % DST_PAGE_SIZE
    k = tl.load(
        src_k_ptr + src_page * src_k_page + src_slot * src_k_slot + offs_h[:, None] * src_k_head + offs_d[None, :],
        mask=mask,
    )
    v = tl.load(
        src_v_ptr + src_page * src_v_page + src_slot * src_v_slot + offs_h[:, None] * src_v_head + offs_d[None, :],
        mask=mask,
    )
    tl.store(
        dst_k_ptr + dst_page * dst_k_page + dst_slot * dst_k_slot + offs_h[:, None] * dst_k_head + offs_d[None, :],
        k,
        mask=mask,
    )
    tl.store(
        dst_v_ptr + dst_page * dst_v_page + dst_slot * dst_v_slot + offs_h[:, None] * dst_v_head + offs_d[None, :],
        v,
        mask=mask,
    )


def _copy_kv_rows(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    num_rows: int,
    src_rows: torch.Tensor | None,
    dst_rows: torch.Tensor | None,
) -> None:
    """Copy rows between 4-D paged tensors (all of one shape per pair, last dim contiguous)."""
    if num_rows == 0:
        return
    for t in (src_k, src_v, dst_k, dst_v):
        if t.stride(-1) != 1:
            raise ValueError("KV tensors must be contiguous in their last (head_dim) dimension")
    bits = _BITS_DTYPE[src_k.element_size()]
    src_k, src_v, dst_k, dst_v = (t.view(bits) for t in (src_k, src_v, dst_k, dst_v))
    num_heads, head_dim = src_k.shape[2], src_k.shape[3]
    _copy_kv_rows_kernel[(num_rows,)](
        src_k,
        src_v,
        dst_k,
        dst_v,
        src_k if src_rows is None else src_rows,
        dst_k if dst_rows is None else dst_rows,
        *src_k.stride()[:3],
        *src_v.stride()[:3],
        *dst_k.stride()[:3],
        *dst_v.stride()[:3],
        SRC_PAGE_SIZE=src_k.shape[1],
        DST_PAGE_SIZE=dst_k.shape[1],
        HAS_SRC_ROWS=src_rows is not None,
        HAS_DST_ROWS=dst_rows is not None,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """In place: token t's key/value go to flat slot `slot_mapping[t]` (block * block_size + offset); < 0 skips."""
    check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    _copy_kv_rows(key[:, None], value[:, None], k_cache, v_cache, key.shape[0], None, slot_mapping)


def move_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In place: slot `dst_slots[i]` receives what slot `src_slots[i]` held before the call.

    All sources are gathered into a buffer before anything is written, so sources and destinations may overlap
    in any way; slots must be valid (non-negative) and destinations distinct.
    """
    check_move_kv_args(k_cache, v_cache, src_slots, dst_slots)
    num_rows = src_slots.shape[0]
    rows_k = k_cache.new_empty(num_rows, 1, *k_cache.shape[2:])
    rows_v = torch.empty_like(rows_k)
    _copy_kv_rows(k_cache, v_cache, rows_k, rows_v, num_rows, src_slots, None)
    _copy_kv_rows(rows_k, rows_v, k_cache, v_cache, num_rows, None, dst_slots)
