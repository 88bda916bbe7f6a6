"""Routes transformers' attention through leapserve's paged tree-attention kernels.

`AttentionMetadata` is built once per step and handed to the model: to transformers' modules as a keyword argument,
to leapserve's own Llama (`llama.py`) through `forward_context`, which the attention op reads (`paged_attention_op`:
C++ on CPU, `kernels/cpu_ops.py`), so that a compiled graph holds one opaque op per layer and no per-step Python
object. Every attention layer
writes its new K/V into the paged cache by slot and attends through `leapserve.kernels` (an `AttentionStep`, which
runs the Triton kernels on CUDA and the PyTorch reference on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from leapserve.kernels import AttentionStep, backend_for, cpu_ops

from .kv_cache import PagedKVCache
from .observe import ATTENTION_RANGE, profiled_range

ATTN_IMPLEMENTATION = "leapserve"


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    step: AttentionStep  # slot mapping, block tables, lengths, tree mask: checked and planned once per step


def attend_layer(
    meta: AttentionMetadata, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float | None
) -> torch.Tensor:
    """Write this step's new K/V `[T, Hkv, D]` into `layer`'s cache, then attend `q` `[T, Hq, D]` over it."""
    k_cache, v_cache = meta.cache.k[layer], meta.cache.v[layer]
    with profiled_range(ATTENTION_RANGE):
        meta.step.write_kv(k, v, k_cache, v_cache)
        return meta.step.attend(q, k_cache, v_cache, scale)


_current: list[AttentionMetadata] = []  # the step being run, for the custom op


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    """Make `meta` the step that `paged_attention_op` attends with, for the duration of one forward."""
    _current.append(meta)
    in_cpp = cpu_ops.push_step(meta.cache.k, meta.cache.v, meta.step)
    try:
        yield
    finally:
        _current.pop()
        if in_cpp:
            cpu_ops.pop_step()


def current_step() -> AttentionMetadata:
    if not _current:
        raise RuntimeError("leapserve attention ran outside a forward_context (run the model through the engine)")
    return _current[-1]


def paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """One layer's K/V write and attention as one opaque op, for a compiled graph: the C++ op on CPU once it is built
    (`kernels/cpu_ops.py`; the step's plan is pushed to it by `forward_context`), the Python op otherwise."""
    if q.device.type == "cpu" and cpu_ops.loaded() is not None and backend_for(q.device) == "reference":
        return torch.ops.leapserve_cpu.paged_attention(q, k, v, layer, scale)
    return torch.ops.leapserve.paged_attention(q, k, v, layer, scale)


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """`attend_layer` with the current step's metadata (writes the layer's cache, which is not a graph tensor)."""
    return attend_layer(current_step(), q, k, v, layer, scale)


def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


# torch.library.Library rather than the custom_op decorator: ~2 us of dispatch a call instead of ~7 us
_lib = torch.library.Library("leapserve", "FRAGMENT")
_lib.define("paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor")
_lib.impl("paged_attention", _paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("leapserve::paged_attention", _paged_attention_shape, lib=_lib)


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
    # transformers' attention modules set layer_idx (a Module's attributes are typed Tensor | Module)
    layer = cast(int, module.layer_idx)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    return attend_layer(leapserve_meta, q, k, v, layer, scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """The kernel builds masks itself from the metadata; transformers must not materialise a dense one."""
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
