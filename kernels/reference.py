"""PyTorch implementations of the three kernels: the test oracle's twin, and the production path on CPU.

`tree_attention` gathers each sequence's K/V through its block table (a plain slice when its blocks are
consecutive) and calls `torch.nn.functional.scaled_dot_product_attention`, with no mask whenever every query may
see every key (a single query, a bidirectional block), `is_causal` for a causal block with no context, and an
explicit boolean mask otherwise; a step where every sequence has one query runs as a single padded call.
The per-step part (`plan_tree_attention`) can be computed once and passed to every layer. fp16/bf16 are computed
in fp32 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .validation import check_move_kv_args, check_tree_attention_args, check_tree_attention_values, check_write_kv_args


def _visibility(
    context_len: int,
    num_new: int,
    tree_rows: torch.Tensor | None,
    context_row: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for one sequence's queries over its `context_len + num_new` keys; `context_row`:
    which context keys may be seen (None: all)."""
    if context_row is not None and not bool(context_row.all()):
        mask = torch.empty(num_new, context_len + num_new, dtype=torch.bool, device=device)
        mask[:, :context_len] = context_row
        mask[:, context_len:] = (
            torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril() if tree_rows is None else tree_rows
        )
        return mask, False
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


@dataclass
class SeqPlan:
    start: int  # the sequence's rows in q
    end: int
    keys: slice | torch.Tensor  # its keys' flat cache slots: a range when its blocks are consecutive, else an index
    mask: torch.Tensor | None
    causal: bool


# A step whose sequences all have at most this many new tokens (decoding, verifying drafts) runs as one padded
# SDPA call; longer ones (prefill) run one call per sequence, where padding would waste real work.
BATCHED_MAX_QUERIES = 16


@dataclass
class BatchedPlan:
    slots: torch.Tensor  # [B * max_keys] flat cache slots, each sequence's keys then padding
    mask: torch.Tensor  # bool [B, 1, max_q, max_keys]
    rows: torch.Tensor  # [T]: each packed query's row in the padded [B * max_q] queries
    max_q: int


@dataclass
class AttentionPlan:
    """Everything `tree_attention` derives from a step's metadata, computed once and reused by every layer."""

    seqs: list[SeqPlan]
    # (context lengths, tree mask, context mask, max_q, device) when all sequences can run as one padded call
    batch_inputs: tuple | None = None

    @cached_property
    def batched(self) -> BatchedPlan | None:
        """The one padded call, built on first use: the compiled CPU path's own attention never needs it."""
        return None if self.batch_inputs is None else _batched_plan(self.seqs, *self.batch_inputs)


def plan_tree_attention(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    tree_mask: torch.Tensor | None,
    block_size: int,
    context_mask: torch.Tensor | None = None,
) -> AttentionPlan:
    cu, ctx_lens = cu_seqlens_q.tolist(), context_lens.tolist()
    device = block_tables.device
    seqs = []
    for b, ctx in enumerate(ctx_lens):
        start, end = cu[b], cu[b + 1]
        num_keys = ctx + end - start
        if start == end:
            continue
        blocks = block_tables[b, : -(-num_keys // block_size)].tolist()
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            keys: slice | torch.Tensor = slice(blocks[0] * block_size, blocks[0] * block_size + num_keys)
        else:
            keys = (
                torch.tensor(blocks, device=device)[:, None] * block_size + torch.arange(block_size, device=device)
            ).flatten()[:num_keys]
        mask, causal = _visibility(
            ctx,
            end - start,
            None if tree_mask is None else tree_mask[start:end, : end - start],
            None if context_mask is None else context_mask[b, :ctx],
            device,
        )
        seqs.append(SeqPlan(start, end, keys, mask, causal))
    max_q = max((s.end - s.start for s in seqs), default=0)
    if len(seqs) > 1 and len(seqs) == len(ctx_lens) and max_q <= BATCHED_MAX_QUERIES:
        return AttentionPlan(seqs, (ctx_lens, tree_mask, context_mask, max_q, device))
    return AttentionPlan(seqs)


def _batched_plan(
    seqs: list[SeqPlan],
    ctx_lens: list[int],
    tree_mask: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    max_q: int,
    device: torch.device,
) -> BatchedPlan:
    max_keys = max(ctx + s.end - s.start for s, ctx in zip(seqs, ctx_lens))
    slots = torch.empty(len(seqs), max_keys, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), 1, max_q, max_keys, dtype=torch.bool, device=device)
    rows: list[int] = []
    for i, (s, ctx) in enumerate(zip(seqs, ctx_lens)):
        n = s.end - s.start
        own = torch.arange(s.keys.start, s.keys.stop, device=device) if isinstance(s.keys, slice) else s.keys
        slots[i, : ctx + n] = own
        # Padding re-reads the sequence's own last key: masked out, and finite (0 * NaN from a stale slot is NaN).
        slots[i, ctx + n :] = own[-1]
        mask[i, 0, :n, :ctx] = True if context_mask is None else context_mask[i, :ctx]
        mask[i, 0, :n, ctx : ctx + n] = (
            torch.ones(n, n, dtype=torch.bool, device=device).tril()
            if tree_mask is None
            else tree_mask[s.start : s.end, :n]
        )
        mask[i, 0, n:, 0] = True  # padding queries see one key (no NaN); their outputs are dropped
        rows.extend(range(i * max_q, i * max_q + n))
    return BatchedPlan(slots.flatten(), mask, torch.tensor(rows, device=device), max_q)


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`tree_attention` with the metadata already checked and planned (no per-call host work beyond the plan)."""
    compute_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    num_kv_heads, head_dim = k_cache.shape[2:]
    flat_k, flat_v = k_cache.reshape(-1, num_kv_heads, head_dim), v_cache.reshape(-1, num_kv_heads, head_dim)
    if plan.batched is not None:
        o = _attend_batched(q, flat_k, flat_v, plan.batched, scale, compute_dtype)
        if out is None:
            return o
        out.copy_(o)
        return out
    if out is None and len(plan.seqs) != 1:
        out = torch.empty_like(q)
    contiguous = k_cache.is_contiguous() and v_cache.is_contiguous()
    for s in plan.seqs:
        if contiguous and isinstance(s.keys, slice):  # consecutive blocks: one strided view, no copy
            keys, values = _heads_view(k_cache, s.keys), _heads_view(v_cache, s.keys)
        else:
            keys, values = flat_k[s.keys][None].transpose(1, 2), flat_v[s.keys][None].transpose(1, 2)
        queries = q[s.start : s.end].transpose(0, 1)[None]
        if compute_dtype != q.dtype:
            queries, keys, values = queries.to(compute_dtype), keys.to(compute_dtype), values.to(compute_dtype)
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=s.mask, is_causal=s.causal, scale=scale, enable_gqa=True
        )[0].transpose(0, 1)
        if out is None:  # one sequence covering all of q: hand back SDPA's result without another copy
            return o if o.dtype == q.dtype else o.to(q.dtype)
        out[s.start : s.end] = o
    assert out is not None  # allocated above unless one sequence returned SDPA's result
    return out


def _attend_batched(
    q: torch.Tensor,
    flat_k: torch.Tensor,
    flat_v: torch.Tensor,
    bp: BatchedPlan,
    scale: float | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """All sequences as one SDPA call over `[B, H, max_q, max_keys]`, padded queries and keys masked."""
    num_seqs = bp.mask.shape[0]
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = flat_k.shape[1]
    if bp.max_q == 1:  # decoding: q already is [B, Hq, D]
        queries = q[:, None]
    else:
        queries = q.new_zeros(num_seqs * bp.max_q, num_q_heads, head_dim).index_copy_(0, bp.rows, q)
    queries = queries.view(num_seqs, bp.max_q, num_q_heads, head_dim).transpose(1, 2)
    # [B, Hkv, max_keys, D]: SDPA's fused CPU kernel wants 4-D inputs (3-D takes a 5x slower path).
    keys = flat_k.index_select(0, bp.slots).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = flat_v.index_select(0, bp.slots).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        queries.to(compute_dtype),
        keys.to(compute_dtype),
        values.to(compute_dtype),
        attn_mask=bp.mask,
        scale=scale,
        enable_gqa=True,
    )
    o = o.transpose(1, 2).reshape(num_seqs * bp.max_q, num_q_heads, head_dim)
    return (o if bp.max_q == 1 else o.index_select(0, bp.rows)).to(q.dtype)


def _heads_view(cache: torch.Tensor, rows: slice) -> torch.Tensor:
    """Flat slots `rows` of a contiguous `[num_blocks, block_size, H, D]` cache as a `[1, H, L, D]` view."""
    _, _, heads, head_dim = cache.shape
    return cache.as_strided(
        (1, heads, rows.stop - rows.start, head_dim),
        (0, head_dim, heads * head_dim, 1),
        cache.storage_offset() + rows.start * heads * head_dim,
    )


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

    The contract (`context_mask` included) is in docs/kernel.md; `out`, if given, receives the result.
    """
    check_tree_attention_args(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tree_mask, out, context_mask
    )
    check_tree_attention_values(
        cu_seqlens_q.tolist(),
        context_lens.tolist(),
        q.shape[0],
        block_tables.shape[1] * k_cache.shape[1],
        None if tree_mask is None else tree_mask.shape[1],
        None if context_mask is None else context_mask.shape[1],
    )
    plan = plan_tree_attention(block_tables, context_lens, cu_seqlens_q, tree_mask, k_cache.shape[1], context_mask)
    return attend(q, k_cache, v_cache, plan, scale, out)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """In place: token t's key/value go to flat slot `slot_mapping[t]` (block * block_size + offset); < 0 skips."""
    check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    skip = slots < 0
    if bool(skip.any()):
        keep = ~skip
        slots, key, value = slots[keep], key[keep], value[keep]
    write_rows(key, value, k_cache, v_cache, slots)


def write_rows(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """`write_kv` without checks: every slot (int64) valid and distinct."""
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
