"""Routes transformers' attention through leapserve's paged tree-attention kernels.

`AttentionMetadata` is built once per step and handed to the model as a keyword argument; every attention layer
writes its new K/V into the paged cache by slot and attends through `leapserve.kernels` (an `AttentionStep`, which
runs the Triton kernels on CUDA and the PyTorch reference on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from leapserve.kernels import AttentionStep

from .kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "leapserve"


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    step: AttentionStep  # slot mapping, block tables, lengths, tree mask: checked and planned once per step


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    leapserve_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query `[1, Hq, T, D]`, key/value `[1, Hkv, T, D]` -> `[1, T, Hq, D]`."""
    if leapserve_meta is None:
        raise RuntimeError(
            "the leapserve attention implementation needs `leapserve_meta` (run the model through the engine)"
        )
    meta = leapserve_meta
    # transformers' attention modules set layer_idx (a Module's attributes are typed Tensor | Module)
    layer = cast(int, module.layer_idx)
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    meta.step.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache)
    return meta.step.attend(query[0].transpose(0, 1), k_cache, v_cache, scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """The kernel builds masks itself from the metadata; transformers must not materialise a dense one."""
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
