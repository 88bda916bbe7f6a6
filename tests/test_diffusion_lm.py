"""Masked diffusion LM checkpoints (decoding/diffusion_lm.py): tiny random LLaDA- and Dream-layout checkpoints,
named as their own code names them, load without remote code through `resolve_model` + `load_model`, and their
logits, run bidirectionally through the model runner, equal a reference forward written here from the original
architectures' equations; unsupported variants, pickled weights and malformed markers are refused; conversion is
cached and atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig

from leapserve.decoding.config import ModelConfig
from leapserve.decoding.diffusion_lm import DiffusionSpec, convert_llada, diffusion_spec
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.model_loader import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from leapserve.decoding.runner import ModelRunner, SeqChunk

D, HEADS, KV_HEADS, LAYERS, FFN = 64, 2, 1, 2, 96  # head_dim 32, GQA 2:1
VOCAB = 300
IDS = [5, 17, 200, 3, 9, 120, 77, 250, 1, 42, 42, 7, 260, 33, 8, 150, 299, 0, 64, 11]  # 20 tokens: 2 cache blocks
EOS, MASK = 258, 259  # the test tokenizer's <|endoftext|> and <|mask|>

LLADA_CONFIG = {
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "d_model": D,
    "n_heads": HEADS,
    "n_kv_heads": KV_HEADS,
    "n_layers": LAYERS,
    "mlp_ratio": 4,
    "mlp_hidden_size": FFN,
    "vocab_size": VOCAB - 20,
    "embedding_size": VOCAB,  # padded past vocab_size, as LLaDA allows
    "max_sequence_length": 128,
    "rope": True,
    "rope_theta": 500000.0,
    "rope_full_precision": True,
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "scale_logits": False,
    "input_emb_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-5,
    "activation_type": "silu",
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "multi_query_attention": None,
    "weight_tying": False,
    "flash_attention": False,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
    "mask_token_id": 270,
    "use_cache": False,
    "torch_dtype": "float32",
}

DREAM_CONFIG = {
    "model_type": "Dream",
    "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "hidden_size": D,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_act": "silu",
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": LAYERS,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "bos_token_id": EOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
    "mask_token_id": MASK,
    "use_cache": False,
    "torch_dtype": "float32",
}

# reference part -> tensor name, per layout ({i}: the layer); biases only in Dream
LLADA_NAMES = {
    "embed": "model.transformer.wte.weight",
    "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
    "q": "model.transformer.blocks.{i}.q_proj.weight",
    "k": "model.transformer.blocks.{i}.k_proj.weight",
    "v": "model.transformer.blocks.{i}.v_proj.weight",
    "o": "model.transformer.blocks.{i}.attn_out.weight",
    "ffn_norm": "model.transformer.blocks.{i}.ff_norm.weight",
    "gate": "model.transformer.blocks.{i}.ff_proj.weight",
    "up": "model.transformer.blocks.{i}.up_proj.weight",
    "down": "model.transformer.blocks.{i}.ff_out.weight",
    "final_norm": "model.transformer.ln_f.weight",
    "head": "model.transformer.ff_out.weight",
}
DREAM_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "head": "lm_head.weight",
}
KV = D // HEADS * KV_HEADS
SHAPES = {
    "embed": (VOCAB, D),
    "attn_norm": (D,),
    "q": (D, D),
    "q_bias": (D,),
    "k": (KV, D),
    "k_bias": (KV,),
    "v": (KV, D),
    "v_bias": (KV,),
    "o": (D, D),
    "ffn_norm": (D,),
    "gate": (FFN, D),
    "up": (FFN, D),
    "down": (D, FFN),
    "final_norm": (D,),
    "head": (VOCAB, D),
}


def random_weights(names: dict[str, str], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the layout, random; norm weights around 1 (so a swapped norm shows)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for part, name in names.items():
        for i in range(LAYERS) if "{i}" in name else [None]:
            shape = SHAPES[part]
            w = torch.randn(shape, generator=g) * (0.1 if len(shape) == 1 else 0.2)
            weights[name.format(i=i)] = w + 1 if part.endswith("norm") else w
    return weights


def reference_logits(
    weights: dict[str, torch.Tensor],
    names: dict[str, str],
    ids: list[int],
    eps: float,
    theta: float,
    causal: bool = False,
) -> torch.Tensor:
    """The architectures' own equations: embedding; per layer x += attn_out(softmax(rope(q) rope(k)^T / sqrt(hd)) v)
    over ALL positions (no causal mask unless `causal`; GQA repeats kv heads), then x += down(silu(gate(h)) * up(h))
    with RMSNorm before each; final RMSNorm, head. RoPE: rotate_half with positions 0..n-1. Returns [n, V]."""

    def w(part: str, i: int | None = None) -> torch.Tensor | None:
        return weights.get(names[part].format(i=i)) if part in names else None

    def rms(x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    n, hd = len(ids), D // HEADS
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]  # [n, hd/2]
    angles = torch.cat([angles, angles], -1)[:, None]  # [n, 1, hd]
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(t: torch.Tensor) -> torch.Tensor:  # [n, h, hd]
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = w("embed")[ids]  # [n, D]
    for i in range(LAYERS):
        h = rms(x, w("attn_norm", i))
        q = F.linear(h, w("q", i), w("q_bias", i)).view(n, HEADS, hd)
        k = F.linear(h, w("k", i), w("k_bias", i)).view(n, KV_HEADS, hd).repeat_interleave(HEADS // KV_HEADS, 1)
        v = F.linear(h, w("v", i), w("v_bias", i)).view(n, KV_HEADS, hd).repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->hqk", rope(q), rope(k)) / math.sqrt(hd)  # [H, n, n]
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, D)
        x = x + F.linear(o, w("o", i))
        h = rms(x, w("ffn_norm", i))
        x = x + F.linear(F.silu(F.linear(h, w("gate", i))) * F.linear(h, w("up", i)), w("down", i))
    return F.linear(rms(x, w("final_norm")), w("head"))


def write_tokenizer(path: Path, tokenizer_config: dict) -> None:
    """A byte-level BPE tokenizer in Qwen2's files (vocab.json, merges.txt): 256 byte symbols, two merges, then
    <|endoftext|> (258) and <|mask|> (259) as added specials, as Dream's tokenizer_config declares them."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"he": 256, "ll": 257})
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\nh e\nl l\n")
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(EOS): {"content": "<|endoftext|>", **special}, str(MASK): {"content": "<|mask|>", **special}}
    tokenizer_config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "mask_token": "<|mask|>",
        "model_max_length": 128,
        **tokenizer_config,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def write_checkpoint(path: Path, config: dict, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json and safetensors weights (a model.safetensors.index.json over `shards` files when > 1)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names, weight_map = sorted(weights), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: weights[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def llada_checkpoint(path: Path, shards: int = 1, **overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = random_weights(LLADA_NAMES, seed=1)
    write_checkpoint(path, {**LLADA_CONFIG, **overrides}, weights, shards)
    write_tokenizer(path, {"tokenizer_class": "Qwen2Tokenizer"})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS, "pad_token_id": EOS}))
    return path, weights


def dream_checkpoint(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = random_weights(DREAM_NAMES, seed=2)
    write_checkpoint(path, DREAM_CONFIG, weights)
    write_tokenizer(
        path,
        {
            "tokenizer_class": "DreamTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        },
    )
    (path / "tokenization_dream.py").write_text("raise RuntimeError('remote code must never run')\n")
    return path, weights


def bidirectional_logits(source: Path, impl: str) -> torch.Tensor:
    """All rows' logits of IDS in one forward through the model runner, every token attending to every token."""
    model = load_model(source, ModelConfig(model=str(source)), torch.device("cpu"), torch.float32)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    cache = PagedKVCache(c.num_hidden_layers, 4, 16, c.num_key_value_heads, head_dim, torch.float32, "cpu")
    runner = ModelRunner(model, cache, torch.device("cpu"), model_impl=impl, compile=False)
    assert (runner.llama is not None) == (impl == "leapserve")
    n = len(IDS)
    full = torch.ones(n, n, dtype=torch.bool)
    return runner.execute([SeqChunk([0, 1], 0, IDS, logits_rows=list(range(n)), tree_mask=full)])


def assert_matches_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item()))


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEAPSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "diffusion"


@pytest.mark.parametrize("shards", [1, 2])
def test_llada_loads_as_llama_and_equals_its_equations(tmp_path, tmp_cache, shards):
    src, weights = llada_checkpoint(tmp_path / "LLaDA-tiny", shards)
    converted = resolve_model(str(src))
    assert isinstance(converted, Path) and converted.parent == tmp_cache and converted.name.startswith("LLaDA-tiny-")
    config = AutoConfig.from_pretrained(converted)
    assert type(config).__name__ == "LlamaConfig" and config.architectures == ["LlamaForCausalLM"]
    assert diffusion_spec(config) == DiffusionSpec(mask_token_id=270, logits_shift=False)
    assert (config.vocab_size, config.eos_token_id, config.pad_token_id) == (VOCAB, EOS, EOS)
    assert (converted / "generation_config.json").is_file()
    assert load_tokenizer(converted).decode([256, 257]) == "hell"

    want = reference_logits(weights, LLADA_NAMES, IDS, eps=1e-5, theta=500000.0)
    causal = reference_logits(weights, LLADA_NAMES, IDS, eps=1e-5, theta=500000.0, causal=True)
    assert (causal - want)[:-1].abs().amax(-1).gt(1e-2).all()  # every row but the last tells causal attention apart
    for impl in ("transformers", "leapserve"):
        assert_matches_reference(bidirectional_logits(converted, impl), want)


def test_dream_loads_as_qwen2_with_shifted_logits(tmp_path, tmp_cache):
    src, weights = dream_checkpoint(tmp_path / "Dream-tiny")
    converted = resolve_model(str(src))
    assert isinstance(converted, Path) and converted.parent == tmp_cache
    config = AutoConfig.from_pretrained(converted)
    assert type(config).__name__ == "Qwen2Config"
    spec = diffusion_spec(config)
    assert spec is not None and spec.logits_shift is True and spec.mask_token_id == MASK
    assert (converted / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino  # linked
    assert not (converted / "tokenization_dream.py").exists()

    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "Qwen2Tokenizer" and "auto_map" not in tok_config
    tokenizer = load_tokenizer(converted)  # trust_remote_code=False: the written-out remote code never runs
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == MASK and tokenizer.eos_token_id == EOS
    ids = tokenizer.encode("hello<|mask|>", add_special_tokens=False)
    assert ids[:2] == [256, 257] and ids[-1] == MASK and tokenizer.decode(ids) == "hello<|mask|>"

    want = reference_logits(weights, DREAM_NAMES, IDS, eps=1e-6, theta=1000000.0)
    for impl in ("transformers", "leapserve"):
        assert_matches_reference(bidirectional_logits(converted, impl), want)


def test_conversion_is_cached_and_atomic(tmp_path, tmp_cache):
    src, _ = llada_checkpoint(tmp_path / "LLaDA-tiny")
    first = resolve_model(str(src))
    assert isinstance(first, Path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(src)) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_cache.iterdir()] == [first.name]  # no temporary directories left

    # a tensor LLaDA's llama block has no place for: refused midway, nothing half-written is left behind
    bad, weights = llada_checkpoint(tmp_path / "LLaDA-extra")
    save_file({**weights, "model.transformer.wpe.weight": torch.zeros(4, D)}, bad / "model.safetensors")
    with pytest.raises(ValueError, match="wpe"):
        resolve_model(str(bad))
    assert [p.name for p in tmp_cache.iterdir()] == [first.name]

    # a changed source is converted again, beside the first copy
    (src / "config.json").write_text(json.dumps({**LLADA_CONFIG, "mask_token_id": 271}))
    second = resolve_model(str(src))
    assert second != first and diffusion_spec(AutoConfig.from_pretrained(second)).mask_token_id == 271


@pytest.mark.parametrize(
    "field, value",
    [
        ("alibi", True),
        ("block_group_size", 2),
        ("activation_type", "swiglu"),
        ("include_bias", True),
        ("input_emb_norm", True),
        ("rope", None),  # absent: LLaDA's default is no RoPE
    ],
)
def test_unsupported_llada_variants_are_refused(tmp_path, tmp_cache, field, value):
    src, _ = llada_checkpoint(tmp_path / "LLaDA-tiny", **{field: value})
    if value is None:
        config = json.loads((src / "config.json").read_text())
        del config[field]
        (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        resolve_model(str(src))
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())


def test_pickled_weights_are_refused(tmp_path):
    src = tmp_path / "LLaDA-bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLADA_CONFIG))
    (src / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelNotFoundError, match=r"\.bin"):
        resolve_model(str(src))
    with pytest.raises(ValueError, match=r"\.bin"):
        convert_llada(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entry",
    [
        {"mask_token_id": "7", "logits_shift": False},
        {"mask_token_id": True, "logits_shift": False},
        {"mask_token_id": VOCAB, "logits_shift": False},
        {"mask_token_id": 7, "logits_shift": 1},
        {"mask_token_id": 7},
        {"mask_token_id": 7, "logits_shift": False, "extra": 1},
        [7, False],
    ],
)
def test_malformed_marker_is_refused(entry):
    with pytest.raises(ValueError, match="diffusion_lm"):
        diffusion_spec({"vocab_size": VOCAB, "diffusion_lm": entry})


def test_marker_on_plain_configs():
    assert diffusion_spec(LlamaConfig()) is None
    assert diffusion_spec({"model_type": "llama"}) is None
    marked = LlamaConfig(vocab_size=VOCAB, diffusion_lm={"mask_token_id": 7, "logits_shift": False})
    assert diffusion_spec(marked) == DiffusionSpec(7, False)
    assert diffusion_spec(marked.to_dict()) == DiffusionSpec(7, False)
