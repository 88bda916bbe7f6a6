"""leapserve.kernels: paged tree attention and KV-cache row copies, in Triton and in PyTorch.

Each call picks its implementation from `LEAPSERVE_KERNEL_BACKEND`, read at call time:

- `auto` (default): Triton for CUDA tensors, the PyTorch reference otherwise;
- `triton`: always Triton (on CPU this needs `TRITON_INTERPRET=1` set before the first Triton call; tests only);
- `reference`: always the PyTorch reference.

Triton is imported on first use, so this package imports quickly and works without it.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import reference

__all__ = ["tree_attention", "write_kv", "move_kv", "backend_for"]

_BACKENDS = ("auto", "triton", "reference")


def backend_for(device: torch.device) -> str:
    """'triton' or 'reference': what a call on tensors of `device` runs under the current environment."""
    choice = os.environ.get("LEAPSERVE_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"LEAPSERVE_KERNEL_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice


def _implementation(device: torch.device, triton_module: str) -> ModuleType:
    if backend_for(device) == "reference":
        return reference
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 in the "
                           "environment before leapserve's Triton kernels are first used")
    return importlib.import_module(f"{__name__}.{triton_module}")


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged attention of packed new tokens over their sequences' cached context plus a tree/causal mask.

    Contract in design.md ("The kernel contract"); `out`, if given, receives the result and is returned.
    """
    impl = _implementation(q.device, "tree_attention_triton")
    return impl.tree_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, tree_mask, scale,
                               out=out)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """In place: token t's key/value [T, Hkv, D] go to flat slot `slot_mapping[t]` (= block * block_size + offset).

    Negative slots are skipped; `slot_mapping` is int32 or int64 on the cache's device; key/value have the cache's
    dtype; non-negative slots must be distinct.
    """
    _implementation(k_cache.device, "cache_ops").write_kv(key, value, k_cache, v_cache, slot_mapping)


def move_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In place: slot `dst_slots[i]` receives what slot `src_slots[i]` held before the call (flat slot numbers).

    Every source is read before any destination is written, so overlapping ranges (compacting an accepted tree
    path towards the front) are fine; slots must be non-negative and destinations distinct.
    """
    _implementation(k_cache.device, "cache_ops").move_kv(k_cache, v_cache, src_slots, dst_slots)
