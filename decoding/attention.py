"""Routes transformers' attention through leapserve's paged tree-attention kernels.

`AttentionMetadata` is built once per step and handed to the model as a keyword argument; every attention layer
writes its new K/V into the paged cache by slot and attends through `leapserve.kernels` (an `AttentionStep`, which
runs the Triton kernels on CUDA and the PyTorch reference on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from leapserve.kernels import AttentionStep

from .kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "leapserve"
# Mark attention as a "leapserve.attention" range for torch.profiler (benchmarks turn this on: entering a
# record_function costs tens of microseconds per layer even when no profiler is running).
PROFILE = False


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    step: AttentionStep  # slot mapping, block tables, lengths, tree mask: checked and planned once per step


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    leapserve_meta: AttentionMetadata | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query `[1, Hq, T, D]`, key/value `[1, Hkv, T, D]` -> `[1, T, Hq, D]`."""
    if leapserve_meta is None:
        raise RuntimeError("the leapserve attention implementation needs `leapserve_meta` (run the model through the engine)")
    meta = leapserve_meta
    layer = module.layer_idx
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    if PROFILE:
        with record_function("leapserve.attention"):
            out = _attend(meta, query, key, value, k_cache, v_cache, scaling)
    else:
        out = _attend(meta, query, key, value, k_cache, v_cache, scaling)
    return out.unsqueeze(0), None


def _attend(meta: AttentionMetadata, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float | None) -> torch.Tensor:
    meta.step.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache)
    return meta.step.attend(query[0].transpose(0, 1), k_cache, v_cache, scaling)


def _no_mask(*args, **kwargs) -> None:
    """The kernel builds masks itself from the metadata; transformers must not materialise a dense one."""
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
