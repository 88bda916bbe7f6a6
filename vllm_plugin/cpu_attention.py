"""vLLM's CPU attention (`CPU_ATTN`) routed through leapserve's tree-attention kernel (the PyTorch reference path).

Opt-in, with `LEAPSERVE_VLLM_CPU_ATTENTION=leapserve` in the environment vLLM starts with (its processes inherit
it): vLLM's CPU platform always selects `CPU_ATTN`, so the plugin overrides that name. vLLM still writes K/V
(`do_kv_cache_update`); attention reads them through `leapserve.kernels.tree_attention`. vLLM's CPU cache is
`[blocks, Hkv, 2, block x D]` per its ISA: with the `vec` ISA (AVX2/AVX-512 in fp32) a head's keys are stored
transposed, `[D, block]`, its values `[block, D]`. The blocks a step reads are gathered into leapserve's layout
`[blocks, block, Hkv, D]` and the block tables renumbered. What leapserve's kernel does not cover keeps vLLM's own
kernel: other ISAs (whose key layout is not read here), encoders, sliding windows, ALiBi, soft-capping, sinks, fp8
caches.

Tree speculation (`tree_runner`) puts a tree mask `[T, max_q]` for the step's tokens into the forward context under
`TREE_MASK`; attention then uses it instead of the causal mask, and a layer leapserve's kernel does not cover fails
rather than attend causally.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata

from leapserve.kernels import move_kv, tree_attention

ENV = "LEAPSERVE_VLLM_CPU_ATTENTION"
logger = init_logger("vllm.plugins.leapserve")  # under "vllm": logged as vLLM logs, in every process


TREE_MASK = "leapserve_tree_mask"  # forward-context key: bool [T, max_q], row t sees these new tokens of its sequence
READABLE_ISAS = ("vec",)  # vLLM CPU attention ISAs whose cache layout `leapserve_layout` reads


def leapserve_layout(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The blocks `block_table` names, from vLLM's `vec` CPU cache `[blocks, Hkv, block, 2D]` (per block and head:
    keys `[D, block]`, then values `[block, D]`) into K and V caches of `[used, block, Hkv, D]`, and the table
    renumbered to them (int32)."""
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    used, table = torch.unique(block_table.clamp(min=0), return_inverse=True)
    blocks = kv_cache[used].view(len(used), num_kv_heads, 2, block_size * two_d // 2)
    keys = blocks[:, :, 0].view(len(used), num_kv_heads, two_d // 2, block_size).permute(0, 3, 1, 2)
    values = blocks[:, :, 1].view(len(used), num_kv_heads, block_size, two_d // 2).transpose(1, 2)
    return keys.contiguous(), values.contiguous(), table.to(torch.int32)


def move_slots(kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In place, in vLLM's `vec` CPU cache `[blocks, Hkv, block, 2D]`: slot `dst_slots[i]` receives slot
    `src_slots[i]`'s keys and values (leapserve's `move_kv` over strided views in its own layout)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * d)
    keys = halves[:, :, 0].unflatten(-1, (d, block_size)).permute(0, 3, 1, 2)  # [blocks, block, Hkv, D]
    values = halves[:, :, 1].unflatten(-1, (block_size, d)).transpose(1, 2)
    move_kv(keys, values, src_slots, dst_slots)


class LeapserveCPUAttentionImpl(CPUAttentionBackendImpl):
    announced = False

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tree_mask = get_forward_context().additional_kwargs.get(TREE_MASK) if is_forward_context_available() else None
        if attn_metadata is not None and tree_mask is not None and not self._covered(layer, attn_metadata):
            name, isa = getattr(layer, "layer_name", "?"), getattr(layer, "isa", None)
            raise RuntimeError(
                f"leapserve tree speculation: leapserve's CPU attention does not cover layer {name} (ISA {isa!r}, "
                f"needs one of {READABLE_ISAS}; causal decoder attention only)"
            )
        if attn_metadata is None or not self._covered(layer, attn_metadata):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if not LeapserveCPUAttentionImpl.announced:
            LeapserveCPUAttentionImpl.announced = True
            logger.info("leapserve tree attention serves vLLM's CPU attention layers (%s)", ENV)
        t = attn_metadata.num_actual_tokens
        cu = attn_metadata.query_start_loc.to(torch.int32)
        num_seqs = cu.numel() - 1
        context_lens = (attn_metadata.seq_lens[:num_seqs] - (cu[1:] - cu[:-1])).to(torch.int32)
        k_cache, v_cache, table = leapserve_layout(kv_cache, attn_metadata.block_table[:num_seqs])
        out = output[:t].view(t, self.num_heads, self.head_size)
        mask = None if tree_mask is None else tree_mask[:t]
        tree_attention(query[:t], k_cache, v_cache, table, context_lens, cu, mask, self.scale, out=out)
        return output

    def _covered(self, layer: torch.nn.Module, meta: CPUAttentionMetadata) -> bool:
        """A causal decoder layer with nothing leapserve's kernel lacks, on a cache layout read here."""
        return (
            getattr(layer, "isa", None) in READABLE_ISAS
            and self.attn_type == AttentionType.DECODER
            and meta.causal
            and meta.dynamic_causal is None
            and self.alibi_slopes is None
            and self.sliding_window == -1
            and not self.logits_soft_cap
            and self.sinks is None
            and not self.is_fp8_kv_cache
        )


class LeapserveCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[LeapserveCPUAttentionImpl]:
        return LeapserveCPUAttentionImpl
