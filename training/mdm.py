"""`leapserve train mdm`: pretraining / SFT of a masked diffusion LM (MDM) with LLaDA's loss.

Data: JSONL, one `{"prompt": str, "response": str}` per line (raw text, no chat template). A sequence is prompt +
response + EOS, right-padded with EOS to `--seq-len`; the padding is part of the target (LLaDA SFT). Per sequence
t ~ U(0, 1), p = (1 - eps) t + eps (eps 1e-3); every response or padding token (every token with `--pretrain`) is
replaced by the mask token with probability p, independently; the model sees the whole noisy sequence bidirectionally
and the loss is sum over masked tokens of CE / p, divided by the sequence's answer length (its maskable tokens),
averaged over the batch: LLaDA's published SFT (and, with `--pretrain`, pretraining) objective.

The model is a transformers Llama, either from scratch (`--hidden-size ...`, with `--tokenizer char`: a
character-level tokenizer of the data's characters, or `--tokenizer DIR`) or `--init-from` any Llama checkpoint
(an autoregressive one becomes a diffusion LM: it gets a mask token if it has none). The export is a Llama
checkpoint directory whose config.json carries `"diffusion_lm": {"mask_token_id": ..., "logits_shift": false}` (see
`leapserve.decoding.diffusion_lm`) and `"is_causal": false` (transformers then runs it bidirectionally too).
`training.dparallel` reuses the pieces here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args, option
from leapserve.decoding.config import ModelConfig
from leapserve.decoding.diffusion_lm import DiffusionSpec, diffusion_spec
from leapserve.decoding.model_loader import load_model, load_tokenizer, resolve_model

from .checkpoint import command_line, export_checkpoint, model_card
from .data import TrainSequence, batches
from .loop import TrainConfig, train

EPS = 1e-3  # LLaDA's minimum mask probability
EOS_TOKEN, MASK_TOKEN, UNK_TOKEN = "<|eos|>", "<|mdm_mask|>", "<|unk|>"
# renders the last user message's content: the raw prompt the model was trained on
CHAT_TEMPLATE = "{{ (messages | selectattr('role', 'equalto', 'user') | list | last)['content'] }}"
SMALL_MODEL = 1_000_000_000  # parameters; smaller models are exported in float32, larger ones in bfloat16


# ---- data and tokenizer ---------------------------------------------------------------------------------------------


def read_examples(path: str | Path, need_response: bool = True) -> list[dict]:
    """The `{"prompt": str, "response": str}` objects of a JSONL file (`response` optional unless `need_response`)."""
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            ok = isinstance(ex, dict) and isinstance(ex.get("prompt"), str)
            ok = ok and (isinstance(ex.get("response"), str) or (not need_response and "response" not in ex))
            if not ok:
                want = '{"prompt": str, "response": str}' if need_response else '{"prompt": str[, "response": str]}'
                raise ValueError(f"{path}:{n}: expected {want}, got {line.strip()[:80]!r}")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def char_tokenizer(texts: Iterable[str]):
    """A character-level `PreTrainedTokenizerFast` over the characters of `texts`: ids 0-2 are `<|eos|>` (also the
    pad), `<|mdm_mask|>` and `<|unk|>` (characters never seen), then the characters in sorted order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, MASK_TOKEN, UNK_TOKEN]
    chars = sorted(set().union(*map(set, texts)))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tok.decoder = decoders.Fuse()  # join the characters back without spaces
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def mask_token_id(tokenizer, config=None) -> int:
    """The mask token: the config's `diffusion_lm` one, the tokenizer's mask token, or `<|mdm_mask|>` (added to the
    tokenizer when it has none)."""
    spec = diffusion_spec(config) if config is not None else None
    if spec is not None:
        return spec.mask_token_id
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer.mask_token_id


def encode_examples(
    tokenizer, examples: list[dict], seq_len: int, eos: int, pretrain: bool = False
) -> list[TrainSequence]:
    """prompt + response + EOS, cut or EOS-padded to `seq_len`; `loss_mask` marks the maskable tokens (response and
    padding; all with `pretrain`). Examples whose prompt fills `seq_len` (no answer left) are dropped."""
    sequences = []
    for ex in examples:
        prompt = tokenizer.encode(ex["prompt"], add_special_tokens=False)
        if len(prompt) >= seq_len and not pretrain:
            continue
        ids = (prompt + tokenizer.encode(ex["response"], add_special_tokens=False) + [eos])[:seq_len]
        ids += [eos] * (seq_len - len(ids))
        maskable = torch.arange(seq_len) >= (0 if pretrain else len(prompt))
        sequences.append(TrainSequence(torch.tensor(ids), maskable, None))
    return sequences


def stack(batch: list[TrainSequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, maskable), both [B, L], of equal-length sequences."""
    ids = torch.stack([s.input_ids for s in batch]).to(device)
    return ids, torch.stack([s.loss_mask for s in batch]).to(device)


# ---- model ----------------------------------------------------------------------------------------------------------


def bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Make a transformers decoder attend in both directions: `config.is_causal = False` has transformers build
    bidirectional (padding-only) masks, and SDPA must not fall back to its own causal flag when it gets no mask."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def align(logits: torch.Tensor, *per_position: torch.Tensor, shift: bool) -> tuple[torch.Tensor, ...]:
    """Pair each position's logits with its targets and masks ([B, L, ...] each): row j predicts position j, or
    with `shift` (Dream) row j-1 predicts position j, so position 0 is never predicted."""
    if not shift:
        return (logits, *per_position)
    return (logits[:, :-1], *(t[:, 1:] for t in per_position))


def scratch_model(tokenizer, mask_id: int, shape: ScratchShape, seq_len: int) -> torch.nn.Module:
    """A randomly initialised Llama of `shape` and `seq_len` positions over `tokenizer`'s vocabulary, marked
    `diffusion_lm`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size or 3 * shape.hidden_size,  # LLaDA-8B's ratio (4096 -> 12288)
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads or shape.num_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,  # as LLaDA
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        diffusion_lm={"mask_token_id": mask_id, "logits_shift": False},
    )
    return LlamaForCausalLM(config)


def export_diffusion_lm(out: str | Path, model: torch.nn.Module, tokenizer, card: str) -> Path:
    """Write `model` (a transformers LM whose config carries `diffusion_lm`) as a checkpoint directory with its
    tokenizer: float32 weights below `SMALL_MODEL` parameters, bfloat16 above."""
    dtype = torch.float32 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else torch.bfloat16
    config = model.config.to_dict()
    config.update(architectures=[type(model).__name__], dtype=str(dtype).removeprefix("torch."))
    tensors = dict(model.state_dict())
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # the embedding's; safetensors refuses shared tensors
    return export_checkpoint(out, tensors, config, card, dtype, extra_files=tokenizer.save_pretrained)


# ---- LLaDA's loss ---------------------------------------------------------------------------------------------------


def llada_masking(maskable: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's forward process: per row t ~ U(0, 1), p = (1 - eps) t + eps, each maskable token masked with
    probability p. `maskable` bool [B, L] -> (masked bool [B, L], p [B])."""
    t = torch.rand(maskable.shape[0], device=maskable.device)
    p = (1 - eps) * t + eps
    return (torch.rand(maskable.shape, device=maskable.device) < p[:, None]) & maskable, p


def llada_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_len: torch.Tensor,
    logits_shift: bool = False,
) -> torch.Tensor:
    """mean_b [ sum_{i masked in b} CE(logits[b, i], targets[b, i]) / p_mask[b] / answer_len[b] ] over logits
    [B, L, V], targets [B, L], masked bool [B, L], p_mask [B], answer_len [B] (LLaDA's SFT formula)."""
    logits, targets, masked = align(logits, targets, masked, shift=logits_shift)
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    per_row = (ce * masked).sum(1) / p_mask / answer_len.clamp(min=1)
    return per_row.mean()


# ---- the trainer ----------------------------------------------------------------------------------------------------


@dataclass
class ScratchShape:
    """The shape of a Llama trained from scratch (`train mdm`, `train sft`; unused with --init-from)."""

    hidden_size: int = option(128, "from scratch")
    num_layers: int = option(4, "from scratch")
    num_heads: int = option(4, "from scratch")
    num_kv_heads: int | None = option(None, "from scratch (default: --num-heads)")
    intermediate_size: int | None = option(None, "from scratch (default: 3 x --hidden-size)")

    def validate(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads) < 1 or self.hidden_size % self.num_heads:
            raise ValueError("need positive sizes and --hidden-size divisible by --num-heads")


@dataclass
class MDMTraining(TrainConfig):
    """MDM's optimizer settings, where they differ from `TrainConfig`'s."""

    lr: float = 1e-3
    warmup_steps: int = 100
    batch_size: int = 32


@dataclass
class MDMConfig:
    data: str = option(help='JSONL of {"prompt": str, "response": str} (raw text)')
    out: str = option(help="where the checkpoint is exported")
    init_from: str | None = option(None, "start from this Llama checkpoint (else from scratch, shaped as below)")
    tokenizer: str | None = option(
        None, "char: a character-level tokenizer of the data; DIR: that tokenizer (default: char, or --init-from's)"
    )
    seq_len: int = option(64, "tokens per sequence: prompt + response + EOS padding (cut if longer)")
    pretrain: bool = option(False, "mask every token, prompt included (pretraining); default: answers only (SFT)")
    work_dir: str | None = option(None, "training state, resumable (default: <out>.train)")
    shape: ScratchShape = field(default_factory=ScratchShape)
    train: TrainConfig = field(default_factory=MDMTraining)

    def validate(self) -> None:
        if self.init_from and self.tokenizer == "char":
            raise ValueError("--tokenizer char builds a new vocabulary: it needs a model from scratch, not --init-from")
        if self.seq_len < 2:
            raise ValueError("need --seq-len >= 2")
        self.shape.validate()
        self.train.validate()


def _model_and_tokenizer(cfg: MDMConfig, examples: list[dict], device: torch.device):
    if cfg.init_from:
        source = resolve_model(cfg.init_from)
        model = load_model(source, ModelConfig(model=cfg.init_from), device, torch.float32)
        tokenizer = load_tokenizer(cfg.tokenizer or source)
        mask_id = mask_token_id(tokenizer, model.config)
        if mask_id >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        spec = diffusion_spec(model.config) or DiffusionSpec(mask_id, False)
        model.config.diffusion_lm = {"mask_token_id": spec.mask_token_id, "logits_shift": spec.logits_shift}
    else:
        if cfg.tokenizer in (None, "char"):
            tokenizer = char_tokenizer(ex["prompt"] + ex["response"] for ex in examples)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
        model = scratch_model(tokenizer, mask_token_id(tokenizer), cfg.shape, cfg.seq_len)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (needed to end and pad answers)")
    return bidirectional(model).to(device), tokenizer


def train_mdm(cfg: MDMConfig) -> Path:
    """Train a masked diffusion LM on `cfg.data` and export it to `cfg.out`."""
    cfg.validate()
    device = cfg.train.torch_device
    examples = read_examples(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = _model_and_tokenizer(cfg, examples, device)
    spec = diffusion_spec(model.config)
    eos = tokenizer.eos_token_id
    sequences = encode_examples(tokenizer, examples, cfg.seq_len, eos, cfg.pretrain)
    if spec.logits_shift:  # position 0 has no row before it
        for s in sequences:
            s.loss_mask[0] = False
    if len(sequences) < cfg.train.batch_size:
        raise ValueError(f"{cfg.data}: {len(sequences)} usable examples, fewer than --batch-size")

    def loss_fn(batch: list[TrainSequence]) -> torch.Tensor:
        ids, maskable = stack(batch, device)
        masked, p_mask = llada_masking(maskable)
        logits = model(input_ids=torch.where(masked, spec.mask_token_id, ids)).logits
        return llada_loss(logits, ids, masked, p_mask, maskable.sum(1), spec.logits_shift)

    work = Path(cfg.work_dir or f"{cfg.out.rstrip('/')}.train")
    run = {
        "data": str(Path(cfg.data).resolve()),
        "examples": len(sequences),
        "init_from": cfg.init_from,
        "tokenizer": cfg.tokenizer,
        "vocab_size": len(tokenizer),
        "mask_token_id": spec.mask_token_id,
        "seq_len": cfg.seq_len,
        "pretrain": cfg.pretrain,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
    }
    stream = batches(sequences, cfg.train.batch_size, cfg.seq_len, cfg.train.seed)
    result = train(model, loss_fn, stream, cfg.train, work, desc="mdm", run=run)
    response_tokens = int(sum(s.loss_mask.sum() for s in sequences))
    tokenizer_name = cfg.tokenizer or ("the model's" if cfg.init_from else "char")
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: v for k, v in vars(cfg.train).items() if k != "max_len"},
        "steps done": result.step,
        "final loss (mean of the last 50 steps)": result.loss,
    }
    summary = (
        f"A masked diffusion LM ({'LLaDA pretraining' if cfg.pretrain else 'LLaDA SFT'} loss), "
        f"{'initialised from `' + cfg.init_from + '`' if cfg.init_from else 'trained from scratch'}: a Llama "
        f"({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, vocabulary {len(tokenizer)}) "
        f"run with bidirectional attention, mask token {spec.mask_token_id} (`diffusion_lm` in config.json). "
        'Serve it with `leapserve serve --model PATH --decoder dparallel --diffusion-config \'{"gen_length": N, '
        '"block_length": B}\'`.'
    )
    data = (
        f"`{cfg.data}`: {len(sequences)} sequences of {cfg.seq_len} tokens (prompt + response + EOS padding), "
        f"{response_tokens} of them maskable; tokenizer {tokenizer_name}."
    )
    card = model_card(
        "Masked diffusion LM",
        summary=summary,
        command=command_line(),
        data=data,
        training=facts,
        metrics={"final train loss": result.loss, "steps": result.step},
    )
    out = export_diffusion_lm(cfg.out, model, tokenizer, card)
    print(json.dumps({"out": str(out), "steps": result.step, "loss": result.loss}), flush=True)
    return out


def training_options(cls: type) -> list[str]:
    """A trainer's `TrainConfig` options less `max_len` (its sequence length is its own option)."""
    return [f.name for f in fields(cls) if f.name != "max_len"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `mdm` (as `leapserve train mdm`)."""
    p = subparsers.add_parser(
        "mdm",
        help="train a masked diffusion LM (LLaDA's loss), from scratch or from a Llama checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_arguments(p, MDMConfig)
    add_config_arguments(p.add_argument_group("model from scratch"), ScratchShape)
    add_config_arguments(p.add_argument_group("training"), MDMTraining, only=training_options(MDMTraining))
    p.set_defaults(handler=lambda a: train_mdm(config_from_args(MDMConfig, a)))
