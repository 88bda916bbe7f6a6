"""The paged KV cache: per-layer K/V tensors `[num_blocks, block_size, Hkv, D]` and the free-block pool."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # One allocation for every layer's K and V, so that `move_slots` moves a slot in all of them at once.
        # torch.empty: pages are committed lazily on CPU; stale rows are never read (attention reads < length).
        self._kv = torch.empty((2, num_layers, *shape), dtype=dtype, device=device)
        self.k = list(self._kv[0])  # per layer, views
        self.v = list(self._kv[1])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def flat_slots(self, block_table: list[int], positions: Iterable[int]) -> list[int]:
        """Flat slot numbers (block * block_size + offset) of a sequence's cache positions."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in positions]

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """In every layer's K and V, flat slot `dst[i]` receives what slot `src[i]` held before the call, in one
        gather and one scatter for the whole model (not a `move_kv` per layer and tensor). Destinations must be
        distinct."""
        rows = self._kv.view(-1, self.num_blocks * self.block_size, *self._kv.shape[-2:])  # [2 * layers, slots, Hkv, D]
        rows[:, torch.tensor(dst, device=rows.device)] = rows[:, torch.tensor(src, device=rows.device)]

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence needs so that `num_tokens` positions fit."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to hold `num_tokens` positions; False (and no change) if blocks ran out."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self._free):
            return False
        block_table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()
