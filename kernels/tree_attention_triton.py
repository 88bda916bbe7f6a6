"""Triton paged tree attention: packed new tokens of many sequences attend their cached context plus a tree mask.

One program handles one query tile of one sequence, one KV head and one split of the sequence's keys:

- GQA: the tile's rows are (query, query head) pairs for the Hq/Hkv query heads sharing the KV head, so every
  K/V tile is loaded once for the whole group.
- Paging: each key position's page comes from the block table, so tiles need not align with pages.
- Context keys (< context_len) are all visible, or those the optional context mask allows; new keys go through
  the tree mask (or the causal rule).
- Online softmax in fp32 (exp2 domain). With few query tiles the keys are split over several programs
  (flash-decoding) and a second kernel merges the partial results.

Contract: docs/kernel.md. Values (cu_seqlens_q, context_lens) are not checked here, to avoid a
device synchronisation; the reference checks them. Laid out by hand (kept out of `ruff format`): the launch and
helper calls pass some twenty tile arguments each, which read best packed.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .validation import check_tree_attention_args

MAX_SPLITS = 32


@triton.jit
def _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence owning query tile `tile`; sequence b owns tiles cu[b] // BLOCK_Q + b .. cu[b+1] // BLOCK_Q + b."""
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    return lo


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, tree_mask_ptr, context_mask_ptr,
                 key_start, key_end, context_len, query_idx, token_idx, row_valid, offs_d, d_valid, scale_log2e,
                 stride_k_b, stride_k_s, stride_v_b, stride_v_s, stride_tm,
                 NEW_KEYS: tl.constexpr, HAS_TREE_MASK: tl.constexpr, HAS_CONTEXT_MASK: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """Fold keys [key_start, key_end) into the running softmax state (acc, m_i, l_i)."""
    for start in range(key_start, key_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < key_end
        page = tl.load(block_table_ptr + pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        kv_mask = d_valid[:, None] & in_range[None, :]
        k = tl.load(k_ptr + (page * stride_k_b + slot * stride_k_s)[None, :] + offs_d[:, None], mask=kv_mask, other=0.0)
        if NATIVE_DOT:
            scores = tl.dot(q, k)
        else:
            scores = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        if NEW_KEYS:
            new_idx = pos - context_len
            if HAS_TREE_MASK:
                visible = tl.load(tree_mask_ptr + token_idx[:, None] * stride_tm + new_idx[None, :],
                                  mask=row_valid[:, None] & in_range[None, :], other=0) != 0
            else:
                visible = (new_idx[None, :] <= query_idx[:, None]) & in_range[None, :]
        elif HAS_CONTEXT_MASK:
            visible = (tl.load(context_mask_ptr + pos, mask=in_range, other=0) != 0)[None, :]
        else:
            visible = in_range[None, :]
        scores = tl.where(visible, scores * scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (page * stride_v_b + slot * stride_v_s)[:, None] + offs_d[None, :],
                    mask=in_range[:, None] & d_valid[None, :], other=0.0)
        if NATIVE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tree_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, tree_mask_ptr, context_mask_ptr,
        num_seqs, num_tokens, num_q_heads, scale_log2e,
        stride_q_t, stride_q_h, stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
        stride_o_t, stride_o_h, stride_bt, stride_tm, stride_cm,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_TREE_MASK: tl.constexpr,
        HAS_CONTEXT_MASK: tl.constexpr, NUM_SPLITS: tl.constexpr, NATIVE_DOT: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_query = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q
    if first_query >= num_new:
        return
    context_len = tl.load(context_lens_ptr + seq)
    num_keys = context_len + num_new

    # Tile rows are (query, head-in-group) pairs.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    query_idx = first_query + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (query_idx < num_new) & (rows % GROUP_PAD < GROUP)
    token_idx = q_start + query_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + token_idx[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :], mask=q_mask,
                other=0.0)
    if not NATIVE_DOT:
        q = q.to(tl.float32)

    if NUM_SPLITS == 1:
        key_lo = 0
        key_hi = num_keys
    else:
        chunk = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
        key_lo = split * chunk
        key_hi = tl.minimum(key_lo + chunk, num_keys)
    if HAS_TREE_MASK:
        new_hi = key_hi
    else:  # causal: nothing past the tile's last query is visible
        new_hi = tl.minimum(key_hi, context_len + tl.minimum(first_query + BLOCK_Q, num_new))

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_ptr = k_cache_ptr + kv_head * stride_k_h
    v_ptr = v_cache_ptr + kv_head * stride_v_h
    seq_context_mask_ptr = context_mask_ptr + seq.to(tl.int64) * stride_cm
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, tree_mask_ptr, seq_context_mask_ptr,
        key_lo, tl.minimum(key_hi, context_len), context_len, query_idx, token_idx, row_valid, offs_d, d_valid,
        scale_log2e, stride_k_b, stride_k_s, stride_v_b, stride_v_s, stride_tm,
        NEW_KEYS=False, HAS_TREE_MASK=HAS_TREE_MASK, HAS_CONTEXT_MASK=HAS_CONTEXT_MASK, BLOCK_N=BLOCK_N,
        PAGE_SIZE=PAGE_SIZE, NATIVE_DOT=NATIVE_DOT)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, tree_mask_ptr, seq_context_mask_ptr,
        tl.maximum(key_lo, context_len), new_hi, context_len, query_idx, token_idx, row_valid, offs_d, d_valid,
        scale_log2e, stride_k_b, stride_k_s, stride_v_b, stride_v_s, stride_tm,
        NEW_KEYS=True, HAS_TREE_MASK=HAS_TREE_MASK, HAS_CONTEXT_MASK=HAS_CONTEXT_MASK, BLOCK_N=BLOCK_N,
        PAGE_SIZE=PAGE_SIZE, NATIVE_DOT=NATIVE_DOT)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token_idx[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part_row = (split * num_tokens + token_idx) * num_q_heads + head
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=q_mask)


@triton.jit
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_tokens, num_q_heads,
                         stride_o_t, stride_o_h, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the per-split (unnormalised acc, max, sum) of one (token, query head) into the output row."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.arange(0, SPLITS_PAD)
    split_valid = split < NUM_SPLITS
    part_row = (split * num_tokens + token) * num_q_heads + head
    m = tl.load(part_max_ptr + part_row, mask=split_valid, other=float("-inf"))
    l_part = tl.load(part_sum_ptr + part_row, mask=split_valid, other=0.0)
    m_all = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    total = tl.sum(weight * l_part, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    acc = tl.load(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=split_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_valid)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_shape(dtype: torch.dtype, block_d: int, group_pad: int, mean_queries: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_N). Tile rows (BLOCK_Q x GROUP_PAD) are 16 (tl.dot's minimum) to 64 (16 for fp32 or
    head_dim > 128); with 8 warps every such shape compiles for sm_90 without register spills (ptxas)."""
    max_rows = 16 if dtype == torch.float32 or block_d > 128 else 64
    block_q = min(triton.next_power_of_2(mean_queries), max(1, max_rows // group_pad))
    return max(block_q, 16 // group_pad, 1), 16 if block_d > 128 else 32


def _default_splits(device: torch.device, programs: int, key_capacity: int) -> int:
    """Key splits so that about four programs run per SM when the query tiles alone are too few."""
    if device.type != "cuda":
        return 1
    sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= 2 * sm_count:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(4 * sm_count, programs), key_capacity // 256))


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   scale: float | None = None, *, out: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Triton implementation of the `tree_attention` contract; `num_splits` overrides the key-split heuristic."""
    check_tree_attention_args(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tree_mask, out,
                              context_mask)
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if head_dim > 256:
        raise ValueError(f"the Triton kernel supports head_dim <= 256, got {head_dim}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last (head_dim) dimension")
    if out is None:
        out = torch.empty_like(q)
    elif out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last (head_dim) dimension")
    if num_tokens == 0:
        return out
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # The kernel assumes unit stride along the last dimension of these (no copy in the usual case).
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens, cu_seqlens_q = context_lens.contiguous(), cu_seqlens_q.contiguous()
    if tree_mask is not None and tree_mask.stride(-1) != 1:
        tree_mask = tree_mask.contiguous()
    if context_mask is not None and context_mask.stride(-1) != 1:
        context_mask = context_mask.contiguous()

    num_seqs = block_tables.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    block_q, block_n = _tile_shape(q.dtype, block_d, group_pad, triton.cdiv(num_tokens, num_seqs))
    num_tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = _default_splits(q.device, num_tiles * num_kv_heads, block_tables.shape[1] * page_size)
    if num_splits > 1:
        part_acc = torch.empty(num_splits, num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_splits, num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    scale = head_dim ** -0.5 if scale is None else scale
    # Tensor-core dots in the input precision, except bf16 in the CPU interpreter (wrong there: upcast to fp32).
    native_dot = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and q.device.type != "cpu")
    _tree_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, context_lens, cu_seqlens_q, q if tree_mask is None else tree_mask.view(torch.uint8),
        q if context_mask is None else context_mask.view(torch.uint8),
        num_seqs, num_tokens, num_q_heads, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        block_tables.stride(0), 0 if tree_mask is None else tree_mask.stride(0),
        0 if context_mask is None else context_mask.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE_SIZE=page_size, HAS_TREE_MASK=tree_mask is not None, HAS_CONTEXT_MASK=context_mask is not None,
        NUM_SPLITS=num_splits, NATIVE_DOT=native_dot,
        num_warps=8, num_stages=2)
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, part_acc, part_max, part_sum, num_tokens, num_q_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=max(triton.next_power_of_2(num_splits), 2), HEAD_DIM=head_dim,
            BLOCK_D=block_d, num_warps=4)
    return out
