"""One engine step's attention metadata, checked and planned once, then applied by every layer.

The functional kernels (`tree_attention`, `write_kv`) check their arguments and, on the reference path, read the
metadata on the host at every call; a model with 30 layers would repeat that 30 times per step. `AttentionStep`
does it once (vLLM's "metadata built once per step") and then only launches the work.
"""

from __future__ import annotations

import torch

from . import reference
from .backend import backend_for, implementation
from .validation import check_tree_attention_values, check_write_kv_args


class AttentionStep:
    def __init__(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        tree_mask: torch.Tensor | None,
        block_size: int,
        context_mask: torch.Tensor | None = None,
    ):
        """Arguments as in `write_kv` and `tree_attention`; the caches are given per layer."""
        self.slot_mapping = slot_mapping.long()
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.cu_seqlens_q = cu_seqlens_q
        self.tree_mask = tree_mask
        self.context_mask = context_mask
        self.use_triton = backend_for(block_tables.device) == "triton"
        if self.use_triton:
            self._triton_attention = implementation(block_tables.device, "tree_attention_triton")
            self._triton_cache_ops = implementation(block_tables.device, "cache_ops")
            self.plan: reference.AttentionPlan | None = None
        else:
            cu = cu_seqlens_q.tolist()
            check_tree_attention_values(
                cu,
                context_lens.tolist(),
                cu[-1],
                block_tables.shape[1] * block_size,
                None if tree_mask is None else tree_mask.shape[1],
                None if context_mask is None else context_mask.shape[1],
            )
            if min(self.slot_mapping.tolist(), default=0) < 0:  # on the host: no tensor ops for a scalar check
                raise ValueError("AttentionStep needs a cache slot for every new token (no negative slots)")
            self.plan = reference.plan_tree_attention(
                block_tables, context_lens, cu_seqlens_q, tree_mask, block_size, context_mask
            )
        self._checked_layout: tuple | None = None

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Write this step's new K/V `[T, Hkv, D]` into one layer's cache."""
        if self.use_triton:
            self._triton_cache_ops.write_kv(key, value, k_cache, v_cache, self.slot_mapping)
            return
        layout = (key.shape, key.dtype, k_cache.shape, k_cache.dtype)
        if layout != self._checked_layout:  # every layer has the same shapes: check the first, and any change
            check_write_kv_args(key, value, k_cache, v_cache, self.slot_mapping)
            self._checked_layout = layout
        reference.write_rows(key, value, k_cache, v_cache, self.slot_mapping)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """`tree_attention` of this step's queries `[T, Hq, D]` over one layer's cache."""
        if self.use_triton:
            return self._triton_attention.tree_attention(
                q,
                k_cache,
                v_cache,
                self.block_tables,
                self.context_lens,
                self.cu_seqlens_q,
                self.tree_mask,
                scale,
                context_mask=self.context_mask,
            )
        assert self.plan is not None  # planned in __init__ whenever Triton is not used
        return reference.attend(q, k_cache, v_cache, self.plan, scale)
