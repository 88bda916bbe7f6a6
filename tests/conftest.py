"""Shared fixtures: tiny random-weight Llama checkpoints on disk, with SmolLM2's real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (transformers may import it), so set it here, before any
# test module: without a GPU the Triton kernels run in the interpreter; with one they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def save_tiny_llama(
    path: Path, tokenizer, *, layers: int = 2, hidden: int = 64, heads: int = 2, kv_heads: int = 1, seed: int = 0
) -> Path:
    """A random-weight Llama with the given tokenizer, saved as a safetensors checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    # Larger weights than the default init give peaked, varied next-token distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from leapserve.decoding.config import DEFAULT_MODEL
    from leapserve.decoding.model_loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """2-layer, head_dim 32, GQA 2:1 random Llama with SmolLM2's tokenizer and chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)
