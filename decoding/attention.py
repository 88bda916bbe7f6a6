"""Routes transformers' attention through leapserve's paged tree-attention kernels.

`AttentionMetadata` is built once per step and handed to the model as a keyword argument; every attention layer
writes its new K/V into the paged cache by slot and attends through `leapserve.kernels.tree_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from leapserve.kernels import tree_attention, write_kv

from .kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "leapserve"


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    slot_mapping: torch.Tensor  # int64 [T]: flat cache slot of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B]: tokens in the cache before this step
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    tree_mask: torch.Tensor | None = None  # bool [T, max_q]; None = causal


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    leapserve_meta: AttentionMetadata | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query `[1, Hq, T, D]`, key/value `[1, Hkv, T, D]` -> `[1, T, Hq, D]`."""
    if leapserve_meta is None:
        raise RuntimeError("the leapserve attention implementation needs `leapserve_meta` (run the model through the engine)")
    meta = leapserve_meta
    layer = module.layer_idx
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    with record_function("leapserve.attention"):  # lets profilers split a step into attention / matmul / rest
        write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta.slot_mapping)
        out = tree_attention(query[0].transpose(0, 1), k_cache, v_cache, meta.block_tables, meta.context_lens,
                             meta.cu_seqlens_q, meta.tree_mask, scaling)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """The kernel builds masks itself from the metadata; transformers must not materialise a dense one."""
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
