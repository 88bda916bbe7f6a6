"""The paged KV cache's slot moves (compacting accepted draft paths), against the reference `move_kv` per layer."""

from __future__ import annotations

import pytest
import torch

from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.kernels import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_move_slots_moves_every_layer_as_move_kv_does(dtype: torch.dtype) -> None:
    cache = PagedKVCache(3, 6, 16, 2, 8, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for layer in cache.k + cache.v:  # written through the per-layer views the model uses
        layer.copy_(torch.randn(layer.shape, generator=gen).to(dtype))
    expected_k, expected_v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
    # an accepted path 2, 5, 6 compacted towards its root at slot 40 (overlapping), in another block a path 3, 4,
    # and a swap, which only "read every source before writing" gets right
    src, dst = [42, 45, 46, 83, 84, 20, 21], [41, 42, 43, 81, 82, 21, 20]
    for k, v in zip(expected_k, expected_v):
        reference.move_kv(k, v, torch.tensor(src), torch.tensor(dst))
    cache.move_slots(src, dst)
    for got, want in zip(cache.k + cache.v, expected_k + expected_v):
        assert torch.equal(got, want)
    assert not torch.equal(expected_k[0], expected_k[1])  # layers differ: one layer's rows copied everywhere fails


def test_flat_slots_follow_the_block_table() -> None:
    cache = PagedKVCache(1, 6, 16, 2, 8, torch.float32, torch.device("cpu"))
    assert cache.flat_slots([4, 1], [0, 15, 16, 20]) == [64, 79, 16, 20]
