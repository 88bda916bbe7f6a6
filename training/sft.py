"""`leapserve train sft`: supervised fine-tuning of a causal LM on prompt/response pairs.

Data: JSONL, one `{"prompt": str, "response": str}` per line (raw text, no chat template). A sequence is prompt +
response + EOS; the loss is the mean next-token cross-entropy over the response and EOS tokens of the batch (the
prompt is context only). Batches are right-padded, which a causal model never attends to.

The model is a transformers Llama, either from scratch (`--hidden-size ...`, with `--tokenizer char`: a
character-level tokenizer of the data's characters, or `--tokenizer DIR`; `train mdm`'s builders, made causal) or
`--init-from` any causal Llama checkpoint (say to fine-tune on another format). Full fine-tuning, or LoRA
(`--lora-rank R`) merged into the weights at export. The export is a plain Llama checkpoint directory with its
tokenizer, served by the autoregressive decoder. `train dart` starts from such a checkpoint.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args, option
from leapserve.decoding.config import ModelConfig
from leapserve.decoding.diffusion_lm import diffusion_spec
from leapserve.decoding.model_loader import load_model, load_tokenizer, resolve_model

from .checkpoint import command_line, model_card
from .data import TrainSequence, batches
from .dparallel import add_lora, merge_lora
from .loop import TrainConfig, train
from .mdm import (
    ScratchShape,
    char_tokenizer,
    export_diffusion_lm,
    mask_token_id,
    read_examples,
    scratch_model,
    training_options,
)

# ---- data and loss --------------------------------------------------------------------------------------------------


def encode_pair(tokenizer, prompt: str, response: str, eos: int) -> TrainSequence:
    """prompt + response + EOS, with `loss_mask` on the response and EOS tokens."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = prompt_ids + tokenizer.encode(response, add_special_tokens=False) + [eos]
    return TrainSequence(torch.tensor(ids), torch.arange(len(ids)) >= len(prompt_ids), None)


def collate(batch: list[TrainSequence], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, loss mask), both [B, W], right-padded with `pad` (never a target)."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    targets = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = s.input_ids
        targets[row, : len(s.loss_mask)] = s.loss_mask
    return ids.to(device), targets.to(device)


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting `ids[:, j]` from `logits[:, j - 1]` over the positions j where `targets`
    ([B, L] bool) is set, all rows together; 0 when none is. logits [B, L, V], ids [B, L]."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L - 1]
    mask = targets[:, 1:]
    return (ce * mask).sum() / mask.sum().clamp(min=1)


# ---- the trainer ----------------------------------------------------------------------------------------------------


@dataclass
class SFTTraining(TrainConfig):
    """SFT's optimizer settings, where they differ from `TrainConfig`'s."""

    lr: float = 1e-3
    warmup_steps: int = 50
    batch_size: int = 32


@dataclass
class SFTConfig:
    data: str = option(help='JSONL of {"prompt": str, "response": str} (raw text)')
    out: str = option(help="where the checkpoint is exported")
    init_from: str | None = option(None, "start from this causal Llama checkpoint (else from scratch, shaped as below)")
    tokenizer: str | None = option(
        None, "char: a character-level tokenizer of the data; DIR: that tokenizer (default: char, or --init-from's)"
    )
    seq_len: int = option(128, "tokens per sequence, cut if longer (from scratch: also the model's position limit)")
    lora_rank: int = option(0, "LoRA rank on q/k/v/o/gate/up/down, merged at export (0: full fine-tuning)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    work_dir: str | None = option(None, "training state, resumable (default: <out>.train)")
    shape: ScratchShape = field(default_factory=ScratchShape)
    train: TrainConfig = field(default_factory=SFTTraining)

    def validate(self) -> None:
        if self.init_from and self.tokenizer == "char":
            raise ValueError("--tokenizer char builds a new vocabulary: it needs a model from scratch, not --init-from")
        if self.seq_len < 2 or self.lora_rank < 0:
            raise ValueError("need --seq-len >= 2 and --lora-rank >= 0")
        self.shape.validate()
        self.train.validate()


def causal_scratch_model(tokenizer, shape: ScratchShape, seq_len: int) -> torch.nn.Module:
    """`train mdm`'s from-scratch Llama without its diffusion marker: a causal LM."""
    model = scratch_model(tokenizer, mask_token_id(tokenizer), shape, seq_len)
    del model.config.diffusion_lm
    return model


def _model_and_tokenizer(cfg: SFTConfig, examples: list[dict], device: torch.device):
    if cfg.init_from:
        source = resolve_model(cfg.init_from)
        model = load_model(source, ModelConfig(model=cfg.init_from), device, torch.float32)
        if diffusion_spec(model.config) is not None:
            raise ValueError(f"{cfg.init_from} is a masked diffusion LM (diffusion_lm in config.json), not a causal LM")
        tokenizer = load_tokenizer(cfg.tokenizer or source)
    else:
        if cfg.tokenizer in (None, "char"):
            tokenizer = char_tokenizer(ex["prompt"] + ex["response"] for ex in examples)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
        model = causal_scratch_model(tokenizer, cfg.shape, cfg.seq_len)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (needed to end answers)")
    return model.to(device), tokenizer


def finetuning_fact(model: torch.nn.Module, lora_rank: int, lora_alpha: float | None) -> tuple[str, float]:
    """Wrap `model` in LoRA when `lora_rank` (frozen base); (the model card's description, alpha)."""
    alpha = lora_alpha or lora_rank
    if not lora_rank:
        return "full", alpha
    adapted = add_lora(model, lora_rank, alpha)
    return f"LoRA r={lora_rank} alpha={alpha:g} on {adapted} layers, merged", alpha


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune a causal LM on `cfg.data` (loss on the responses) and export it to `cfg.out`."""
    cfg.validate()
    device = cfg.train.torch_device
    examples = read_examples(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = _model_and_tokenizer(cfg, examples, device)
    eos = tokenizer.eos_token_id
    sequences = [encode_pair(tokenizer, ex["prompt"], ex["response"], eos) for ex in examples]
    sequences = [s for s in sequences if s.loss_mask[: cfg.seq_len].any()]  # a prompt filling seq_len: no target
    if len(sequences) < cfg.train.batch_size:
        raise ValueError(f"{cfg.data}: {len(sequences)} usable examples, fewer than --batch-size")
    tuning, alpha = finetuning_fact(model, cfg.lora_rank, cfg.lora_alpha)

    def loss_fn(batch: list[TrainSequence]) -> torch.Tensor:
        ids, targets = collate(batch, eos, device)
        return causal_lm_loss(model(input_ids=ids).logits, ids, targets)

    run = {
        "data": str(Path(cfg.data).resolve()),
        "examples": len(sequences),
        "init_from": cfg.init_from,
        "tokenizer": cfg.tokenizer,
        "vocab_size": len(tokenizer),
        "seq_len": cfg.seq_len,
        "lora": [cfg.lora_rank, alpha],
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
    }
    stream = batches(sequences, cfg.train.batch_size, cfg.seq_len, cfg.train.seed)
    result = train(model, loss_fn, stream, cfg.train, Path(cfg.work_dir or f"{cfg.out.rstrip('/')}.train"), "sft", run)
    merge_lora(model)
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "fine-tuning": tuning,
        **{k: v for k, v in asdict(cfg.train).items() if k != "max_len"},
        "steps done": result.step,
        "final loss (mean of the last 50 steps)": result.loss,
    }
    origin = f"initialised from `{cfg.init_from}`" if cfg.init_from else "trained from scratch"
    summary = (
        f"A causal LM fine-tuned on prompt/response pairs (cross-entropy on the response and EOS), {origin}: a "
        f"Llama ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, vocabulary "
        f"{len(tokenizer)}). Serve it with `leapserve serve --model PATH` (the autoregressive decoder)."
    )
    response_tokens = int(sum(s.loss_mask[: cfg.seq_len].sum() for s in sequences))
    tokenizer_name = cfg.tokenizer or ("the model's" if cfg.init_from else "char")
    data = (
        f"`{cfg.data}`: {len(sequences)} sequences (prompt + response + EOS, at most {cfg.seq_len} tokens), "
        f"{response_tokens} target tokens; tokenizer {tokenizer_name}."
    )
    card = model_card(
        "Supervised fine-tuned causal LM",
        summary=summary,
        command=command_line(),
        data=data,
        training=facts,
        metrics={"final train loss": result.loss, "steps": result.step},
    )
    out = export_diffusion_lm(cfg.out, model, tokenizer, card)  # a plain export despite its name: no marker here
    print(json.dumps({"out": str(out), "steps": result.step, "loss": result.loss}), flush=True)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `sft` (as `leapserve train sft`)."""
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning of a causal LM on prompt/response pairs, from scratch or a Llama checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_arguments(p, SFTConfig)
    add_config_arguments(p.add_argument_group("model from scratch"), ScratchShape)
    add_config_arguments(p.add_argument_group("training"), SFTTraining, only=training_options(SFTTraining))
    p.set_defaults(handler=lambda a: train_sft(config_from_args(SFTConfig, a)))
