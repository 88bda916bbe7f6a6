"""Masked diffusion LMs: the `diffusion_lm` marker in config.json, and LLaDA / Dream checkpoints converted once,
without their remote code, into Llama / Qwen2 checkpoint directories that carry it.

A checkpoint whose config.json has `"diffusion_lm": {"mask_token_id": int, "logits_shift": bool}` is a masked
diffusion LM: it runs bidirectionally, and with `logits_shift` position j is predicted from output row j-1 (Dream)
rather than row j (LLaDA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# copied beside the weights when present (no remote code, nothing pickled)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# LLaDA config field -> (values leapserve runs as Llama, LLaDA's default when config.json omits the field)
LLADA_NEEDS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "rope": ((True,), False),
    "alibi": ((False,), False),
    "attention_layer_norm": ((False,), False),
    "scale_logits": ((False,), False),
    "input_emb_norm": ((False,), False),
    "block_group_size": ((1,), 1),
    "include_bias": ((False,), False),
    "include_qkv_bias": ((False, None), False),
    "bias_for_layer_norm": ((False, None), None),  # None: inherits include_bias
    "layer_norm_with_affine": ((True,), True),
    "block_type": (("llama",), "sequential"),
    "layer_norm_type": (("rms",), "default"),
    # swiglu halves ff_proj's output inside LLaDA's llama block: not Llama's MLP
    "activation_type": (("silu",), "swiglu"),
}

# LLaDA tensor name (after `model.transformer.`) -> LlamaForCausalLM's
LLADA_RENAMES = [
    (re.compile(r"wte\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"ln_f\.weight"), "model.norm.weight"),
    (re.compile(r"ff_out\.weight"), "lm_head.weight"),
    (re.compile(r"blocks\.(\d+)\.attn_norm\.weight"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"blocks\.(\d+)\.ff_norm\.weight"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"blocks\.(\d+)\.([qkv])_proj\.weight"), r"model.layers.\1.self_attn.\2_proj.weight"),
    (re.compile(r"blocks\.(\d+)\.attn_out\.weight"), r"model.layers.\1.self_attn.o_proj.weight"),
    (re.compile(r"blocks\.(\d+)\.ff_proj\.weight"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"blocks\.(\d+)\.up_proj\.weight"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"blocks\.(\d+)\.ff_out\.weight"), r"model.layers.\1.mlp.down_proj.weight"),
]


SPEC_KEYS = {"mask_token_id", "logits_shift", "decoding"}


@dataclass(frozen=True)
class DiffusionSpec:
    mask_token_id: int
    logits_shift: bool  # True: position j's logits are output row j-1 (Dream); False: row j (LLaDA)
    decoding: dict | None = None  # the checkpoint's default diffusion config (what --diffusion-config overrides)


def diffusion_spec(config: Any) -> DiffusionSpec | None:
    """The `diffusion_lm` entry of a transformers config (or its dict); None for an autoregressive model."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    entry = get("diffusion_lm")
    if entry is None:
        return None
    if not isinstance(entry, dict) or not {"mask_token_id", "logits_shift"} <= set(entry) <= SPEC_KEYS:
        raise ValueError(
            f'diffusion_lm must be {{"mask_token_id": int, "logits_shift": bool[, "decoding": {{...}}]}}, got {entry!r}'
        )
    decoding = entry.get("decoding")
    if decoding is not None and not isinstance(decoding, dict):
        raise ValueError(f"diffusion_lm.decoding must be an object (a diffusion config), got {decoding!r}")
    mask, shift = entry["mask_token_id"], entry["logits_shift"]
    vocab = get("vocab_size")
    if not isinstance(mask, int) or isinstance(mask, bool) or mask < 0 or (vocab is not None and mask >= vocab):
        raise ValueError(f"diffusion_lm.mask_token_id must be a token id below vocab_size {vocab}, got {mask!r}")
    if not isinstance(shift, bool):
        raise ValueError(f"diffusion_lm.logits_shift must be true or false, got {shift!r}")
    return DiffusionSpec(mask, shift, decoding)


def _weight_files(src: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of a checkpoint directory, and its shard index (None: one file)."""
    if (src / INDEX_FILE).is_file():
        index = json.loads((src / INDEX_FILE).read_text())
        return sorted(set(index["weight_map"].values())), index
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise ValueError(f"{src} has no {SINGLE_FILE} or {INDEX_FILE}; leapserve never unpickles .bin checkpoints")


def _mask_token_id(config: dict, src: Path) -> int:
    mask = config.get("mask_token_id")
    if not isinstance(mask, int) or isinstance(mask, bool):
        raise ValueError(f"{src}/config.json has no integer mask_token_id, got {mask!r}")
    return mask


def _write_atomic(out: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary sibling of `out`, then rename it to `out` (no half-written checkpoint)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _llada_name(name: str) -> str:
    prefix = "model.transformer."
    if name.startswith(prefix):
        for pattern, repl in LLADA_RENAMES:
            if pattern.fullmatch(name[len(prefix) :]):
                return pattern.sub(repl, name[len(prefix) :])
    raise ValueError(f"unexpected tensor {name!r} in a LLaDA checkpoint (a llama-block LLaDA has no such weight)")


def convert_llada(src: Path, out: Path) -> Path:
    """Write `src` (a LLaDA checkpoint: model_type "llada") as a LlamaForCausalLM directory at `out`, marked
    `diffusion_lm` with no logits shift; refuse (ValueError) a LLaDA variant that is not Llama arithmetic."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    c = json.loads((src / "config.json").read_text())
    for field, (allowed, default) in LLADA_NEEDS.items():
        if c.get(field, default) not in allowed:
            raise ValueError(
                f"{src}: LLaDA config {field}={c.get(field, default)!r} is not supported (needs {allowed[0]!r})"
            )
    d_model, n_heads = c["d_model"], c["n_heads"]
    kv_heads = c.get("n_kv_heads") or (1 if c.get("multi_query_attention") else n_heads)
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=c.get("embedding_size") or c["vocab_size"],  # the embedding may be padded past the vocab
        hidden_size=d_model,
        intermediate_size=c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * d_model,
        num_hidden_layers=c["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=c.get("max_sequence_length", 1024),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)},
        tie_word_embeddings=c.get("weight_tying", True),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        dtype=c.get("torch_dtype") or c.get("dtype"),
    )
    config.diffusion_lm = {"mask_token_id": _mask_token_id(c, src), "logits_shift": False}
    files, index = _weight_files(src)

    def write(tmp: Path) -> None:
        for file in files:  # one shard in memory at a time
            with safe_open(src / file, framework="pt") as f:
                tensors = {_llada_name(name): f.get_tensor(name) for name in f.keys()}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
        if index is not None:
            weight_map = {_llada_name(name): file for name, file in index["weight_map"].items()}
            (tmp / INDEX_FILE).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
        config.save_pretrained(tmp)
        _copy_side_files(src, tmp)

    return _write_atomic(out, write)


def convert_dream(src: Path, out: Path) -> Path:
    """Write `src` (a Dream checkpoint: model_type "Dream", Qwen2 weights) as a Qwen2ForCausalLM directory at `out`,
    marked `diffusion_lm` with the logits shift; weights hard-linked (copied across file systems), the
    DreamTokenizer served as transformers' Qwen2Tokenizer."""
    c = json.loads((src / "config.json").read_text())
    if c.get("use_sliding_window"):
        raise ValueError(f"{src}: Dream config use_sliding_window=true is not supported")
    config = {k: v for k, v in c.items() if k != "auto_map"}
    config.update(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        diffusion_lm={"mask_token_id": _mask_token_id(c, src), "logits_shift": True},
    )
    files, index = _weight_files(src)

    def write(tmp: Path) -> None:
        for file in files + ([INDEX_FILE] if index is not None else []):
            try:
                os.link(src / file, tmp / file)
            except OSError:
                shutil.copyfile(src / file, tmp / file)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _copy_side_files(src, tmp)
        tok_path = tmp / "tokenizer_config.json"
        if tok_path.is_file():
            tok = json.loads(tok_path.read_text())
            tok.pop("auto_map", None)
            if tok.get("tokenizer_class") == "DreamTokenizer":
                tok["tokenizer_class"] = "Qwen2Tokenizer"  # DreamTokenizer is Qwen2's plus added specials
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False))

    return _write_atomic(out, write)


CONVERTERS: dict[str, Callable[[Path, Path], Path]] = {"llada": convert_llada, "dream": convert_dream}


def _source_key(src: Path) -> str:
    """Changes when any file of `src` does (sizes and mtimes of config, weights, tokenizer)."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def converted_checkpoint(src: Path, cache: Path) -> Path | None:
    """For a LLaDA or Dream checkpoint directory, its converted copy under `cache` (converting on first use);
    None for any other checkpoint."""
    model_type = str(json.loads((src / "config.json").read_text()).get("model_type", "")).lower()
    convert = CONVERTERS.get(model_type)
    if convert is None:
        return None
    src = src.resolve()
    out = cache / f"{src.name}-{_source_key(src)}"
    if (out / "config.json").is_file():
        return out
    logger.info("converting %s checkpoint %s for leapserve in %s (first use only)", model_type, src, out)
    return convert(src, out)
