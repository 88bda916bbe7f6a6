"""leapserve's own Llama-family decoder: the fast model path, built from a loaded `transformers` model's weights.

The same arithmetic as transformers' Llama, Mistral and Qwen2 modules (it reuses their rotary embedding), laid out
for speed: q/k/v and gate/up fused into one GEMM each, every GEMM through `PackedLinear` (oneDNN-prepacked on
CPU), attention through one opaque op a layer (C++ on CPU), and a flat `forward(ids [T], positions [T])` over the
packed tokens of a step, so that `torch.compile` sees one static graph per shape class. Fused GEMMs and packed
weights sum in another order than transformers' modules, so logits differ in the last bits (docs/compile.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from leapserve.kernels.packed_linear import PackedLinear

from .attention import attend_layer, current_step, paged_attention_op

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def unsupported(model: PreTrainedModel) -> str | None:
    """Why this model cannot run on leapserve's Llama (None: it can)."""
    c = model.config
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        return f"{arch} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation {c.hidden_act}"
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
        return "sliding-window attention"
    return None


def fused(*linears: nn.Linear) -> PackedLinear:
    """One GEMM for several linears of the same input: their weights (and biases) stacked, and the linears' own
    parameters turned into views of the stack (no second copy; transformers' modules keep working)."""
    weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias for lin in linears]) if len(linears) > 1 else linears[0].bias
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight.data = weight.data[row : row + n]
        if bias is not None:
            lin.bias.data = bias.data[row : row + n]
        row += n
    return PackedLinear(weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` [T, H, D] with cos/sin [T, 1, D] (transformers' rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps: float
    scale: float

    def __init__(self, layer: Any, index: int):  # a transformers decoder layer
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.index = index
        self.scale = float(attn.scaling)
        self.q_size, self.kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        self.head_dim = attn.head_dim
        self.qkv = fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = fused(attn.o_proj)
        self.gate_up = fused(mlp.gate_proj, mlp.up_proj)
        self.down = fused(mlp.down_proj)
        self.norm1, self.norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(rms_norm(x, self.norm1, self.eps)).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = rotate(q.view(t, -1, self.head_dim), cos, sin)  # [T, Hq, D]
        k = rotate(k.view(t, -1, self.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(t, -1, self.head_dim)
        if torch.compiler.is_compiling():
            o = paged_attention_op(q, k, v, self.index, self.scale)
        else:  # eager: no custom-op dispatch
            o = attend_layer(current_step(), q, k, v, self.index, self.scale)
        x = x + self.o(o.reshape(t, self.q_size))
        gate, up = self.gate_up(rms_norm(x, self.norm2, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    """`forward(ids [T], positions [T]) -> final-norm hidden states [T, d]`; `logits(hidden) -> [R, V]` float32.
    Attention metadata comes from `attention.forward_context`."""

    norm: torch.Tensor
    eps: float

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"leapserve's Llama cannot run this model: {reason}")
        decoder: Any = model.get_decoder()
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.blocks = nn.ModuleList(Block(layer, i) for i, layer in enumerate(decoder.layers))
        self.norm, self.eps = decoder.norm.weight, decoder.norm.variance_epsilon
        self.head = PackedLinear(model.get_output_embeddings().weight)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [T, d]
        cos, sin = self.rotary(x[None], positions[None])  # [1, T, D] each
        cos, sin = cos[0, :, None], sin[0, :, None]
        for block in self.blocks:
            x = block(x, cos, sin)
        return rms_norm(x, self.norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()
