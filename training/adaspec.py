"""AdaSPEC (arXiv 2510.19779): selective knowledge distillation of a draft model for speculative decoding.

Stage one (`reference`) distils a reference model from the target with forward KL(target || reference) on every
response token. Stage two (`draft`) distils the draft from the same initialisation on only the top fraction k of
each micro-batch's response tokens by the gap KL(target || draft) - KL(target || reference): tokens the reference
learned but the draft has not yet. `--filter-fraction 1.0` keeps every token: the DistillSpec baseline.

The draft (and the reference) is a smaller copy of the target: the target's own decoder layers picked by
`--init-layers`, its final norm, and its embeddings and LM head *shared with the target and frozen*. The exported
checkpoint stores only the draft's own weights; its config.json lists the shared tensors under
`leapserve_shared_with_target` and the `draft_model` drafter takes them from the target it serves with.

Target distributions come from the data's features (`lm_head(features)`, no target forward) or, for data made with
`--no-features`, from a frozen target forward.

Token budget: as the paper's scripts do (draft epochs and batch both scaled by 1/k), the draft stage takes the same
number of optimizer steps as the reference with `ceil(batch_size / k)` sequences per step (`--draft-batch-size`), so
it trains on about as many selected tokens per step as the reference (and DistillSpec, k = 1) trains on tokens.

One module of about 400 lines: the losses, the draft's construction and export, and the two stages are one method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args, option
from leapserve.decoding.config import DEFAULT_MODEL, ModelConfig
from leapserve.decoding.model_loader import load_model, resolve_model
from leapserve.drafters.checkpoints import SHARED_WITH_TARGET, assemble_draft, load_draft_model

from .checkpoint import command_line, describe_data, export_checkpoint, model_card, write_model_card
from .data import TrainSequence, batches, data_dirs, read_meta, read_sequences
from .evaluate import evaluate_acceptance
from .loop import TrainConfig, train

DEFAULT_FRACTION = 0.4
SHARED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
STAGES = ("reference", "draft", "both")


# ---- losses ---------------------------------------------------------------------------------------------------------


def forward_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_target || q) over the vocabulary, `[N, V]` logits -> `[N]`, in float32."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def select_tokens(gap: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the tokens with `gap >= quantile(gap, 1 - fraction)`: the top `fraction` of this batch."""
    if fraction >= 1.0 or gap.numel() == 0:
        return torch.ones_like(gap, dtype=torch.bool)
    return gap >= torch.quantile(gap.float(), 1.0 - fraction)


def adaspec_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, reference_logits: torch.Tensor | None, fraction: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of KL(target || draft) over the selected tokens, divided by the number of all tokens (HF Trainer's
    `num_items_in_batch`); with `fraction` 1 (or no reference) every token counts: plain forward-KL distillation."""
    kl_draft = forward_kl(target_logits, draft_logits)
    keep = torch.ones_like(kl_draft, dtype=torch.bool)
    if reference_logits is not None and fraction < 1.0:
        with torch.no_grad():
            keep = select_tokens(kl_draft.detach() - forward_kl(target_logits, reference_logits), fraction)
    loss = (kl_draft * keep).sum() / max(kl_draft.numel(), 1)
    return loss, {"kl": kl_draft.detach().mean().item() if kl_draft.numel() else 0.0}


# ---- the draft model ------------------------------------------------------------------------------------------------


def default_layers(num_layers: int, count: int = 3) -> list[int]:
    """`count` of the target's layers, evenly spaced from the first to the last."""
    count = min(count, num_layers)
    if count == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def draft_from_target(target: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy of the target with only `layers` (in that order), trainable, sharing the target's frozen embeddings
    and LM head."""
    num = target.config.num_hidden_layers
    if not layers or any(not 0 <= i < num for i in layers):
        raise ValueError(f"--init-layers must name layers of the target, 0..{num - 1}, got {layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    state = target.state_dict()
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None:
            if name not in SHARED_NAMES:
                weights[name] = tensor.detach().clone()
            continue
        for j, i in enumerate(layers):
            if i == int(match[1]):
                weights[f"model.layers.{j}.{match[2]}"] = tensor.detach().clone()
    shared = [n for n in SHARED_NAMES if n in state]
    draft = assemble_draft(config, weights, target, shared, next(target.parameters()).dtype)
    for name, p in draft.named_parameters():
        p.requires_grad_(name not in shared)
    return draft.to(next(target.parameters()).device)


def draft_export(draft: torch.nn.Module, target_name: str, layers: list[int]) -> tuple[dict, dict]:
    """(the draft's own tensors, its config.json): what `export_checkpoint` writes."""
    shared = [n for n in SHARED_NAMES if n in dict(draft.named_parameters(remove_duplicate=False))]
    tensors = {n: t for n, t in draft.state_dict().items() if n not in shared}
    config = draft.config.to_dict()
    config.update(
        {
            "architectures": [type(draft).__name__],
            "dtype": "float16",
            SHARED_WITH_TARGET: shared,
            "leapserve_target": target_name,
            "leapserve_init_layers": layers,
        }
    )
    return tensors, config


# ---- batches --------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N]: (rows, cols) are the positions whose next token is a response token
    cols: torch.Tensor  # [N]
    features: torch.Tensor | None  # [N, d]: the target's features there


def _prepare(batch: list[TrainSequence], device: torch.device) -> _Batch:
    width = max(len(s.input_ids) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, feats = [], [], []
    for b, s in enumerate(batch):
        ids[b, : len(s.input_ids)] = s.input_ids
        attn[b, : len(s.input_ids)] = 1
        pos = torch.nonzero(s.loss_mask[1:]).flatten()
        rows.append(torch.full_like(pos, b))
        cols.append(pos)
        if s.features is not None:
            feats.append(s.features[pos])
    return _Batch(
        ids.to(device),
        attn.to(device),
        torch.cat(rows).to(device),
        torch.cat(cols).to(device),
        torch.cat(feats).to(device) if feats else None,
    )


def _logits(model: torch.nn.Module, b: _Batch) -> torch.Tensor:
    """The model's logits at the batch's loss positions only (the LM head never sees the rest)."""
    hidden = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    return model.lm_head(hidden[b.rows, b.cols])


# ---- the two stages -------------------------------------------------------------------------------------------------


@dataclass
class AdaSpecTraining(TrainConfig):
    """AdaSPEC's optimizer settings, where they differ from `TrainConfig`'s."""

    warmup_steps: int = 20


@dataclass
class AdaSpecConfig:
    data: str = option(help="`leapserve train data` directories, comma-separated")
    out: str = option(help="where the trained model is exported (the draft; the reference with --stage reference)")
    model: str = option(DEFAULT_MODEL, "the target")
    stage: str = option("both", "reference, draft, or both in turn", choices=STAGES)
    reference: str | None = option(None, "--stage draft: the stage-one checkpoint (default: <work-dir>/reference)")
    work_dir: str | None = option(None, "training states, resumable (default: <out>.train)")
    filter_fraction: float = option(
        DEFAULT_FRACTION, "k: share of each batch's tokens the draft trains on; 1.0 is DistillSpec"
    )
    init_layers: list[int] | None = option(
        None, "target layers the draft starts from, e.g. 0,15,29 (default: 3 evenly spaced)"
    )
    draft_batch_size: int | None = option(
        None, "sequences per step in the draft stage (default: ceil(batch size / k), the paper's budget)"
    )
    eval_prompts: int = option(32, "held-out prompts for the final acceptance (0: skip)")
    eval_set: str = option("mixed", "prompt set (or .jsonl) of the final evaluation")
    eval_max_tokens: int = option(128, "output tokens per evaluation prompt at most")
    num_speculative_tokens: int = option(4, "draft chain length in the evaluation")
    train: TrainConfig = field(default_factory=AdaSpecTraining)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if not 0.0 < self.filter_fraction <= 1.0:
            raise ValueError(f"--filter-fraction must be in (0, 1], got {self.filter_fraction}")
        data_dirs(self.data)  # each a training data directory
        if self.reference is not None and not (Path(self.reference) / "config.json").is_file():
            raise FileNotFoundError(f"--reference {self.reference} is not a checkpoint directory (no config.json)")
        if self.stage == "draft" and self.filter_fraction < 1.0 and self.reference is None:
            raise ValueError(
                "--stage draft with a filter needs --reference (a stage-one checkpoint); "
                "use --stage both, or --filter-fraction 1.0 for DistillSpec"
            )
        if self.eval_prompts < 0 or self.num_speculative_tokens < 1 or self.eval_max_tokens < 1:
            raise ValueError("need --eval-prompts >= 0, --num-speculative-tokens >= 1 and --eval-max-tokens >= 1")
        self.train.validate()

    @property
    def work(self) -> Path:
        return Path(self.work_dir or f"{self.out.rstrip('/')}.train")


def _load_data(cfg: AdaSpecConfig, target: torch.nn.Module) -> list[TrainSequence]:
    metas = read_meta(cfg.data, target.config.hidden_size, target.config.vocab_size)
    # a batch's target distributions come from features only where every sequence has them
    with_features = all(m.get("config", {}).get("features", True) for m in metas)
    sequences = read_sequences(cfg.data, with_features=with_features)
    return [s for s in sequences if s.loss_mask[1 : cfg.train.max_len].any()]  # a response token to learn


def _run_stage(
    cfg: AdaSpecConfig,
    target: torch.nn.Module,
    sequences: list[TrainSequence],
    name: str,
    reference: torch.nn.Module | None,
    out: Path,
) -> dict[str, object]:
    """Train one model (reference: all tokens; draft: the filtered gap) and export it to `out`; returns the
    training facts for the model card."""
    layers = cfg.init_layers or default_layers(target.config.num_hidden_layers)
    fraction = cfg.filter_fraction if name == "draft" else 1.0
    batch_size = cfg.train.batch_size
    if name == "draft":
        batch_size = cfg.draft_batch_size or math.ceil(batch_size / fraction)
    if len(sequences) < batch_size:
        raise ValueError(
            f"--data holds {len(sequences)} sequences with response tokens, fewer than one batch "
            f"({batch_size}); lower --batch-size or make more data"
        )
    device = cfg.train.torch_device
    model = draft_from_target(target, layers)

    def loss_fn(batch: list[TrainSequence]) -> tuple[torch.Tensor, dict[str, float]]:
        b = _prepare(batch, device)
        with torch.no_grad():
            if b.features is not None:
                target_logits = target.lm_head(b.features.to(target.lm_head.weight.dtype))
            else:
                target_logits = _logits(target, b)
            reference_logits = _logits(reference, b) if reference is not None and fraction < 1.0 else None
        return adaspec_loss(_logits(model, b), target_logits, reference_logits, fraction)

    stream = batches(sequences, batch_size, cfg.train.max_len, cfg.train.seed)
    run = {
        "stage": name,
        "init layers": layers,
        "filter fraction k": fraction,
        "batch size": batch_size,
        "max length": cfg.train.max_len,
        "seed": cfg.train.seed,
        "sequences": len(sequences),
    }
    result = train(model, loss_fn, stream, cfg.train, cfg.work / f"{name}-state", desc=name, run=run)
    tensors, config = draft_export(model, cfg.model, layers)
    facts = {
        "target": cfg.model,
        **run,
        "own parameters (trained)": sum(t.numel() for t in tensors.values()),
        "steps": result.step,
        "peak lr": cfg.train.lr,
        "lr schedule": cfg.train.lr_schedule,
        "warmup steps": cfg.train.warmup_steps,
        "weight decay": cfg.train.weight_decay,
        "final loss (mean of the last 50 steps)": result.loss,
        "device": str(device),
    }
    if name == "draft" and fraction < 1.0:
        facts["reference"] = str(cfg.reference or cfg.work / "reference")
    export_checkpoint(out, tensors, config, _card(cfg, facts, None))
    return facts


def _card(cfg: AdaSpecConfig, facts: dict[str, object], metrics: dict[str, object] | None) -> str:
    """The model card of a stage's model, from its training facts (and measured acceptance, once known)."""
    fraction = facts["filter fraction k"]
    method = (
        "AdaSPEC reference (forward KL on all tokens)"
        if facts["stage"] == "reference"
        else "DistillSpec (forward KL on all tokens)"
        if fraction >= 1.0
        else f"AdaSPEC (forward KL on the top {fraction:g} of tokens by the gap to the reference)"
    )
    summary = (
        f"A {len(facts['init layers'])}-layer draft model for speculative decoding with `{cfg.model}`, "
        f"initialised from the target's layers {facts['init layers']} and distilled with {method}. "
        f"Its embeddings and LM head are the target's (`{SHARED_WITH_TARGET}` in config.json): this "
        f'checkpoint holds only its own layers and loads as `--speculative-config \'{{"method": '
        f'"draft_model", "model": "<this directory>", "num_speculative_tokens": '
        f"{cfg.num_speculative_tokens}}}'` on that target."
    )
    return model_card(
        f"{method.split(' (')[0]} draft for {cfg.model}",
        summary=summary,
        command=command_line(),
        data=describe_data(cfg.data),
        training=facts,
        metrics=metrics,
    )


def train_adaspec(cfg: AdaSpecConfig) -> Path:
    """Run the configured stage(s), export the result to `cfg.out`, measure its acceptance and write its card."""
    cfg.validate()
    device = cfg.train.torch_device
    torch.manual_seed(cfg.train.seed)
    target = load_model(resolve_model(cfg.model), ModelConfig(model=cfg.model), device, torch.float32)
    target.requires_grad_(False)
    sequences = _load_data(cfg, target)
    out = Path(cfg.out)
    if cfg.stage == "reference":
        facts = _run_stage(cfg, target, sequences, "reference", None, out)
    else:
        reference = None
        if cfg.filter_fraction < 1.0:
            if cfg.stage == "both":
                _run_stage(cfg, target, sequences, "reference", None, cfg.work / "reference")
            ref_dir = str(cfg.reference or cfg.work / "reference")
            reference = load_draft_model(ref_dir, target, device, torch.float32).requires_grad_(False)
        facts = _run_stage(cfg, target, sequences, "draft", reference, out)
    if cfg.eval_prompts:
        spec = {
            "method": "draft_model",
            "model": str(out.resolve()),
            "num_speculative_tokens": cfg.num_speculative_tokens,
            "adaptive": False,
        }
        acceptance = evaluate_acceptance(
            cfg.model,
            spec,
            prompts=cfg.eval_set,
            num_prompts=cfg.eval_prompts,
            max_tokens=cfg.eval_max_tokens,
            baseline=True,
            seed=cfg.train.seed,
            device=cfg.train.device,
        )
        metrics = {
            "held-out prompts": f"{cfg.eval_prompts} of `{cfg.eval_set}` (test split), greedy, chain of "
            f"{cfg.num_speculative_tokens}",
            **acceptance.as_dict(),
        }
        print(json.dumps({"out": str(out), **acceptance.as_dict()}), flush=True)
        write_model_card(out, _card(cfg, facts, metrics))
    return out


# ---- CLI ------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `adaspec` (as `leapserve train adaspec`)."""
    p = subparsers.add_parser(
        "adaspec",
        help="distil a draft model with AdaSPEC (or DistillSpec)",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_arguments(p, AdaSpecConfig)
    p.add_argument(
        "--no-filter",
        dest="filter_fraction",
        action="store_const",
        const=1.0,
        default=argparse.SUPPRESS,
        help="same as --filter-fraction 1.0 (DistillSpec)",
    )
    add_config_arguments(
        p.add_argument_group("training"),
        AdaSpecTraining,
        overrides={
            "steps": {"help": "optimizer steps per stage"},
            "batch_size": {"help": "sequences per step (reference stage)"},
        },
    )
    p.set_defaults(handler=lambda a: train_adaspec(config_from_args(AdaSpecConfig, a)))
