"""A leapserve FSPAD drafter as a vLLM EAGLE drafter model (the `EagleFSPADLlamaForCausalLM` architecture).

It follows vLLM's EAGLE proposer contract: `forward(input_ids, positions, hidden_states)` reads the target's
final-norm features and returns (token half, feature half); the proposer turns the first into logits with
`compute_logits` and feeds the second back as the next step's features. The network is `FSPADModel`'s:

    u = fc([e; f]) + b                                 fuse, with its bias
    u = u + down(SiLU(gate(e)) * up(RMSNorm(u)))       feature sampling (optional)
    h = u + Attn(u);  z = MLP(RMSNorm(h))              one Llama layer without input norm (vLLM's EAGLE layer)
    token half = h + z[:d], feature half = h + z[d:]   partial alignment: a 2d-wide down_proj (optional)

The embedding is the target's (shared by the proposer); a reduced draft vocabulary brings its own LM head rows
and `d2t` (draft index + d2t = target id), and `compute_logits` scatters its logits over the target vocabulary.
Every tensor of the checkpoint must land in a parameter and every parameter must be loaded: anything else fails
the load (vLLM's stock EAGLE model silently drops an `fc.bias`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM, LlamaDecoderLayer
from vllm.model_executor.models.utils import maybe_prefix

# checkpoint name part -> (parameter name part, shard): vLLM fuses q/k/v and gate/up into one matmul each
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class FeatureSampling(nn.Module):
    """u + down(SiLU(gate(e)) * up(RMSNorm(u))): the next token gates the fused feature."""

    def __init__(self, hidden: int, inner: int, eps: float, prefix: str) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps=eps)
        self.gate = ReplicatedLinear(hidden, inner, bias=False, return_bias=False, prefix=f"{prefix}.gate")
        self.up = ReplicatedLinear(hidden, inner, bias=False, return_bias=False, prefix=f"{prefix}.up")
        self.down = ReplicatedLinear(inner, hidden, bias=False, return_bias=False, prefix=f"{prefix}.down")

    def forward(self, u: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return u + self.down(F.silu(self.gate(embeddings)) * self.up(self.norm(u)))


class FSPADEagleModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0) -> None:
        super().__init__()
        assert vllm_config.speculative_config is not None
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        parts = getattr(config, "leapserve_fspad", None) or {}
        d, inner = config.hidden_size, config.intermediate_size
        self.partial_alignment = bool(parts.get("partial_alignment", False))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, d, prefix=maybe_prefix(prefix, "embed_tokens"))
        self.fc = ReplicatedLinear(2 * d, d, bias=True, return_bias=False, prefix=maybe_prefix(prefix, "fc"))
        self.feature_sampling = (
            FeatureSampling(d, inner, config.rms_norm_eps, maybe_prefix(prefix, "feature_sampling"))
            if parts.get("feature_sampling", False)
            else None
        )
        layer = LlamaDecoderLayer(
            vllm_config, True, prefix=maybe_prefix(prefix, f"layers.{start_layer_id}"), config=config
        )
        if self.partial_alignment:  # a 2d-wide output: token half and feature half
            layer.mlp.down_proj = RowParallelLinear(
                inner, 2 * d, bias=False, prefix=maybe_prefix(prefix, f"layers.{start_layer_id}.mlp.down_proj")
            )
        self.layers = nn.ModuleList([layer])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids `[T]`, positions `[T]`, target features `[T, d]` -> (token half, feature half) `[T, d]` each."""
        embeddings = self.embed_tokens(input_ids)
        u = self.fc(torch.cat((embeddings, hidden_states), dim=-1))
        if self.feature_sampling is not None:
            u = self.feature_sampling(u, embeddings)
        z, h = self.layers[0](positions, u, None)  # z = MLP(RMSNorm(h)), h = u + Attn(u)
        if not self.partial_alignment:
            return h + z, h + z
        d = h.shape[-1]
        return h + z[..., :d], h + z[..., d:]


class EagleFSPADLlamaForCausalLM(EagleLlamaForCausalLM):
    """vLLM's EAGLE drafter class with FSPAD's network, its own LM head rows for a reduced vocabulary, and a load
    that accounts for every tensor."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        assert vllm_config.speculative_config is not None
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        config.draft_vocab_size = draft_vocab
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = FSPADEagleModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), start_layer_id=target_layers
        )
        self.reduced = draft_vocab != config.vocab_size
        if self.reduced:  # its own head over the draft vocabulary; else the proposer shares the target's
            self.lm_head = ParallelLMHead(draft_vocab, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            self.register_buffer("draft_to_target", torch.arange(draft_vocab), persistent=False)
        self.logits_processor = LogitsProcessor(draft_vocab, scale=getattr(config, "logit_scale", 1.0))

    def draft_logits(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the drafter's own vocabulary `[T, V_draft]` and the target ids of its columns (None: the
        target's whole vocabulary): what tree growth ranks, without scattering into the target's vocabulary."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        return logits, (self.draft_to_target if self.reduced else None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary `[T, V]`; with a reduced vocabulary, -inf outside the draft's."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        if not self.reduced or logits is None:
            return logits
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.draft_to_target] = logits
        return full

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "d2t":  # draft index + d2t = target id
                self.draft_to_target.copy_(torch.arange(len(tensor)) + tensor.to(torch.long))
                self.has_own_lm_head = True
                continue
            target = name if name.startswith("lm_head.") else f"model.{name}"
            shard = None
            for part, (fused, shard_id) in STACKED.items():
                if part in target:
                    target, shard = target.replace(part, fused), shard_id
                    break
            if target not in params:
                raise ValueError(f"{type(self).__name__}: checkpoint tensor {name!r} has no parameter ({target!r})")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
        self.has_own_lm_head = self.reduced
        self.has_own_embed_tokens = False
        shared = {"model.embed_tokens.weight"}  # the target's, given by the proposer
        missing = set(params) - loaded - shared
        if missing:
            raise ValueError(f"{type(self).__name__}: the checkpoint leaves parameters unloaded: {sorted(missing)}")
        return loaded | shared
