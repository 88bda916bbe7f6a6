"""leapserve's Triton tree-attention kernel and `write_kv` behind vLLM's attention-backend interface.

Registered as vLLM's `CUSTOM` backend (the one name that survives vLLM spawning its engine and worker processes
before plugins load there) and selected with `--attention-backend CUSTOM`. It keeps vLLM's Triton backend's KV
layout and metadata (`TritonAttentionBackend`): the cache is `[blocks, Hkv, block, 2D]` and
`kv_cache.transpose(1, 2).split(D, -1)` is leapserve's `[blocks, block, Hkv, D]` layout as strided views, so K/V
are written and read in place with no copy. What leapserve's kernel does not cover falls back to vLLM's own
kernel per layer: encoders, sliding windows, ALiBi, soft-capping, sinks, quantized caches, non-causal or
multimodal-prefix masks. The metadata builder declares no full-CUDA-graph support, so attention runs eagerly
between vLLM's piecewise graphs.

vLLM's CPU platform ignores `--attention-backend`; there, `cpu_attention` is the override that runs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from leapserve.kernels import tree_attention, write_kv


class LeapserveTritonAttentionImpl(TritonAttentionImpl):
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TritonAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None or not self._covered(attn_metadata) or output_scale is not None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        t = attn_metadata.num_actual_tokens
        cu = attn_metadata.query_start_loc
        num_seqs = cu.numel() - 1
        context_lens = attn_metadata.seq_lens[:num_seqs] - (cu[1:] - cu[:-1])
        k_cache, v_cache = self._caches(kv_cache)
        out = output[:t].view(t, self.num_heads, self.head_size)
        tree_attention(
            query[:t], k_cache, v_cache, attn_metadata.block_table[:num_seqs], context_lens, cu, None, self.scale,
            out=out,
        )  # fmt: skip
        return output

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if not self._covered(None):
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        k_cache, v_cache = self._caches(kv_cache)
        write_kv(key, value, k_cache, v_cache, slot_mapping[: key.shape[0]])

    def _caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """vLLM's `[blocks, Hkv, block, 2D]` as leapserve's K and V `[blocks, block, Hkv, D]` (views)."""
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)

    def _covered(self, meta: TritonAttentionMetadata | None) -> bool:
        """A causal decoder layer with nothing leapserve's kernel lacks (`meta` None: the layer alone)."""
        layer_ok = (
            self.attn_type == AttentionType.DECODER
            and self.alibi_slopes is None
            and self.sliding_window == (-1, -1)
            and not self.logits_soft_cap
            and self.sinks is None
            and self.kv_cache_dtype == "auto"
            and self.chunk_lookback == -1
        )
        if meta is None or not layer_ok:
            return layer_ok
        return (
            meta.causal is True
            and meta.mm_prefix_range_tensor is None
            and meta.rswa_prefix_lens is None
            and meta.block_table.dtype == torch.int32
        )


class LeapserveTritonAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class LeapserveTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LeapserveTritonAttentionImpl]:
        return LeapserveTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[LeapserveTritonAttentionMetadataBuilder]:
        return LeapserveTritonAttentionMetadataBuilder
