"""The FSPAD feature drafter network: one Llama layer over (target feature, next token).

Position i reads the target's final-norm feature f_i and the embedding of token i+1 (EAGLE's shifted token):

    u = W_fc [e_{i+1}; f_i] + b                                      fuse (2d -> d)
    s = u + W_dn (SiLU(W_g e_{i+1}) * W_up RMSNorm(u))               feature sampling: the token gates the feature
    h = s + Attn(s)                                                  (no input norm, as EAGLE's layer 0)
    z = [h; h] + MLP(RMSNorm(h))                                     partial alignment: a 2d-wide output
    logits = H_lm(z[:d]),  next feature = z[d:]                      token half / feature half

`feature_sampling=False` uses the fuse alone (EAGLE's fc) and `partial_alignment=False` a d-wide output whose one
half serves both roles, which gives the two ablations. The target's embedding and LM head are frozen and shared:
they are passed in, never stored. With a reduced draft vocabulary (`draft_to_target`, the most frequent target
tokens) the head is the target's head restricted to those rows.

Attention is causal SDPA over padded batches in training, and leapserve's paged tree attention (the
paged attention op over the drafter's own one-layer cache) when drafting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from leapserve.decoding.attention import paged_attention_op


@dataclass
class FSPADConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int  # == target_vocab_size unless the vocabulary is reduced
    feature_sampling: bool = True
    partial_alignment: bool = True

    @classmethod
    def from_target(cls, target: LlamaConfig, **overrides) -> FSPADConfig:
        rope = getattr(target, "rope_parameters", None) or {}
        return cls(
            **{
                "hidden_size": target.hidden_size,
                "intermediate_size": target.intermediate_size,
                "num_attention_heads": target.num_attention_heads,
                "num_key_value_heads": target.num_key_value_heads,
                "head_dim": getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads,
                "rms_norm_eps": target.rms_norm_eps,
                "rope_theta": rope.get("rope_theta", 10000.0),
                "max_position_embeddings": target.max_position_embeddings,
                "target_vocab_size": target.vocab_size,
                "draft_vocab_size": target.vocab_size,
                **overrides,
            }
        )

    @classmethod
    def from_dict(cls, d: dict) -> FSPADConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return asdict(self)


class FSPADModel(nn.Module):
    def __init__(self, config: FSPADConfig):
        super().__init__()
        self.config = c = config
        d, inner = c.hidden_size, c.intermediate_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        if c.feature_sampling:
            self.fs_norm = LlamaRMSNorm(d, c.rms_norm_eps)
            self.fs_gate = nn.Linear(d, inner, bias=False)
            self.fs_up = nn.Linear(d, inner, bias=False)
            self.fs_down = nn.Linear(inner, d, bias=False)
        self.q_proj = nn.Linear(d, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(d, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(d, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, d, bias=False)
        self.post_attention_layernorm = LlamaRMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, 2 * d if c.partial_alignment else d, bias=False)
        rope = LlamaConfig(
            hidden_size=d,
            num_attention_heads=c.num_attention_heads,
            head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        )
        self.rotary = LlamaRotaryEmbedding(rope)
        # draft index -> target token id (identity unless the vocabulary is reduced)
        self.register_buffer("draft_to_target", torch.arange(c.draft_vocab_size), persistent=True)

    def forward(
        self,
        features: torch.Tensor,
        embeddings: torch.Tensor,
        positions: torch.Tensor,
        paged: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features, embeddings `[B, L, d]`, positions `[B, L]` -> (token half, feature half), each `[B, L, d]`.

        Causal attention within each row, or with `paged` (B == 1) the paged tree attention of the step in
        `attention.forward_context` (`paged_attention_op` over layer 0 of that step's cache).
        """
        u = self._fuse(features, embeddings)
        q, k, v = self._qkv(u, positions)
        if not paged:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D]
            out = paged_attention_op(q, k, v, 0, self.config.head_dim**-0.5)[None].transpose(1, 2)
        return self._out(u, out)

    def unrolled(
        self, features: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor, steps: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training-time test: `forward` (step 1), then `steps - 1` more drafting steps over the same positions, each
        as deep in a draft chain as at inference. Step s at position i reads the feature step s-1 predicted at i-1
        (held fixed: no gradient flows through it) with embedding i, and attends to step 1's keys at positions up to
        i-s+1 (the context, from the target's features) and to step t's key at i-s+t for t = 2..s (the chain
        drafted on top of it; its own key is the last). Positions i < s-1 have no such chain and are not to be
        trained. Returns each step's (token half, feature half), `[B, L, d]`."""
        length = features.shape[1]
        i = torch.arange(length, device=features.device)
        keys, values, outs = [], [], []
        inputs = features
        for s in range(1, steps + 1):
            u = self._fuse(inputs, embeddings)
            q, k, v = self._qkv(u, positions)
            keys.append(k)
            values.append(v)
            if s == 1:  # plain causal attention, as `forward`
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                # [L, s * L]: block 1 the context up to i-s+1, block t the chain's key at i-s+t
                mask = torch.cat(
                    [i[None, :] <= i[:, None] - s + 1] + [i[None, :] == i[:, None] - s + t for t in range(2, s + 1)],
                    dim=1,
                )
                out = F.scaled_dot_product_attention(
                    q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=mask, enable_gqa=True
                )
            outs.append(self._out(u, out))
            # the next step reads this step's predicted feature at the position before
            inputs = torch.cat([features[:, :1], outs[-1][1][:, :-1].detach()], dim=1)
        return outs

    def _fuse(self, features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        u = self.fc(torch.cat([embeddings, features], dim=-1))
        if self.config.feature_sampling:
            u = u + self.fs_down(F.silu(self.fs_gate(embeddings)) * self.fs_up(self.fs_norm(u)))
        return u

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys, values: `[B, H, L, D]` each."""
        c = self.config
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = self.rotary(v, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _out(self, u: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token half, feature half) from the fused input `u` and the heads' attention `[B, H, L, D]`."""
        b, length, _ = u.shape
        h = u + self.o_proj(attention.transpose(1, 2).reshape(b, length, -1))
        z = self.down_proj(F.silu(self.gate_proj(n := self.post_attention_layernorm(h))) * self.up_proj(n))
        if not self.config.partial_alignment:
            out = h + z
            return out, out
        d = self.config.hidden_size
        return h + z[..., :d], h + z[..., d:]

    def draft_head(self, lm_head: torch.Tensor) -> torch.Tensor:
        """The target's (frozen) LM head weight `[V, d]` restricted to the draft vocabulary `[V_draft, d]`."""
        if self.config.draft_vocab_size == self.config.target_vocab_size:
            return lm_head
        return lm_head[self.draft_to_target.to(lm_head.device)]


FSPAD_EAGLE_ARCHITECTURE = "EagleFSPADLlamaForCausalLM"  # starts with "Eagle": vLLM keeps the name as it is

# Our parameter names -> the EAGLE checkpoint layout vLLM's EAGLE proposer reads (`llama_eagle`);
# the feature-sampling block has no EAGLE counterpart: its names avoid the q/k/v and gate/up parts vLLM fuses.
EAGLE_NAMES = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "q_proj.weight": "layers.0.self_attn.q_proj.weight",
    "k_proj.weight": "layers.0.self_attn.k_proj.weight",
    "v_proj.weight": "layers.0.self_attn.v_proj.weight",
    "o_proj.weight": "layers.0.self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
    "gate_proj.weight": "layers.0.mlp.gate_proj.weight",
    "up_proj.weight": "layers.0.mlp.up_proj.weight",
    "down_proj.weight": "layers.0.mlp.down_proj.weight",
    "fs_norm.weight": "feature_sampling.norm.weight",
    "fs_gate.weight": "feature_sampling.gate.weight",
    "fs_up.weight": "feature_sampling.up.weight",
    "fs_down.weight": "feature_sampling.down.weight",
}


def to_eagle_layout(model: FSPADModel, lm_head: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """The drafter as an EAGLE checkpoint (tensors, config.json), with the feature-sampling block and the 2d-wide
    down_proj where the drafter has them. Its architecture, `EagleFSPADLlamaForCausalLM`, is the one leapserve's
    vLLM plugin registers (the plain EAGLE ablation too: vLLM's stock EAGLE model would drop its fc bias)."""
    c = model.config
    tensors = {EAGLE_NAMES[name]: t for name, t in model.state_dict().items() if name in EAGLE_NAMES}
    reduced = c.draft_vocab_size != c.target_vocab_size
    if reduced:
        ids = model.draft_to_target
        tensors["lm_head.weight"] = lm_head[ids.to(lm_head.device)]
        tensors["d2t"] = ids - torch.arange(len(ids), device=ids.device)  # target = draft + d2t[draft]
    config = {
        "architectures": [FSPAD_EAGLE_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "vocab_size": c.target_vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "tie_word_embeddings": False,
        "leapserve_fspad": {"feature_sampling": c.feature_sampling, "partial_alignment": c.partial_alignment},
    }
    return tensors, config


def from_eagle_layout(tensors: dict[str, torch.Tensor], config: dict) -> tuple[FSPADConfig, dict[str, torch.Tensor]]:
    """The inverse of `to_eagle_layout`: our config and state dict."""
    ours = FSPADConfig(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        max_position_embeddings=config["max_position_embeddings"],
        target_vocab_size=config["vocab_size"],
        draft_vocab_size=config.get("draft_vocab_size") or config["vocab_size"],
        **config["leapserve_fspad"],
    )
    inverse = {eagle: name for name, eagle in EAGLE_NAMES.items()}
    state = {inverse[name]: t for name, t in tensors.items() if name in inverse}
    d2t = tensors.get("d2t")
    state["draft_to_target"] = (
        torch.arange(ours.draft_vocab_size) if d2t is None else d2t.long() + torch.arange(len(d2t), device=d2t.device)
    )
    return ours, state
