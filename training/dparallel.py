"""`leapserve train dparallel`: dParallel's certainty-forcing distillation (arXiv 2509.26488) of a masked diffusion LM.

Trajectories: the model answers the data's prompts with its own threshold decoding (leapserve's `dparallel` decoder,
greedy), stored in `<work-dir>/trajectories.jsonl` as they come and reused on resume. `--keep correct` keeps only
answers equal to the data's `response` (a reference); the default keeps all, as dParallel.

Loss (the LLaDA variant of dParallel's published training code): a sequence is prompt + trajectory + EOS padding, L
= P + gen_length. A random block [s, e) of the response (block n ~ U{0, ..., ceil(R / b) - 1}, R = L - P, the last
one possibly shorter) is the active block: positions before it stay clean, each of its tokens is masked with p = (1
- eps) 0.5 + eps independently (mask m), everything after it is masked. View A masks m, view B the complement; both
are run bidirectionally and L = CE_A + CE_B + beta (Ent_A + Ent_B), where CE_X is the mean cross-entropy over X's
masked block tokens and Ent_X the mean entropy of softmax(logits / T_H) (T_H 0.5) over those of them the model
already predicts correctly (argmax == trajectory token). beta 2 is dParallel's LLaDA setting; `--beta 0` is the
trajectory-following control. (dParallel draws n up to floor(R / b), an empty block when b divides R; we draw only
non-empty blocks.)

LoRA (`--lora-rank R`) on the q/k/v/o/gate/up/down projections, merged into the weights at export, or full
fine-tuning (`--lora-rank 0`). The export keeps the base model's `diffusion_lm` marker.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args, option
from leapserve.decoding.config import ModelConfig
from leapserve.decoding.diffusion import RULES
from leapserve.decoding.diffusion_lm import diffusion_spec
from leapserve.decoding.model_loader import load_model, load_tokenizer, resolve_model

from .checkpoint import command_line, model_card
from .data import TrainSequence, batches
from .loop import TrainConfig, train
from .mdm import EPS, align, bidirectional, export_diffusion_lm, read_examples, training_options

TRAJECTORIES = "trajectories.jsonl"
MASK_RATIO = 0.5  # dParallel's fixed t
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GENERATE_CHUNK = 64  # prompts per engine call (stored before the next)


# ---- the loss -------------------------------------------------------------------------------------------------------


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the last axis, in float32: [..., V] -> [...]."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _view_terms(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE mean over the masked positions, entropy mean over those predicted correctly); 0 for an empty set."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    correct = mask & (logits.argmax(-1) == targets)
    ent = entropy(logits, temperature)
    return (ce * mask).sum() / mask.sum().clamp(min=1), (ent * correct).sum() / correct.sum().clamp(min=1)


def certainty_forcing_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    targets: torch.Tensor,
    mask_a: torch.Tensor,
    mask_b: torch.Tensor,
    beta: float,
    temperature: float = 0.5,
    logits_shift: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """dParallel's L = CE_A + CE_B + beta (Ent_A + Ent_B) for the two views' logits [B, L, V], the trajectory
    `targets` [B, L] and the views' loss positions `mask_a`, `mask_b` bool [B, L] (means over all rows' positions
    together, as dParallel); with `logits_shift` row j-1 predicts position j."""
    logits_a, targets_a, mask_a = align(logits_a, targets, mask_a, shift=logits_shift)
    logits_b, targets_b, mask_b = align(logits_b, targets, mask_b, shift=logits_shift)
    ce_a, ent_a = _view_terms(logits_a, targets_a, mask_a, temperature)
    ce_b, ent_b = _view_terms(logits_b, targets_b, mask_b, temperature)
    loss = ce_a + ce_b + beta * (ent_a + ent_b)
    return loss, {"ce": (ce_a + ce_b).item(), "ent": (ent_a + ent_b).item()}


def complementary_views(
    prompt_lens: torch.Tensor, lengths: torch.Tensor, width: int, block_length: int, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dParallel's semi-autoregressive masking of rows with prompt lengths P and lengths L ([B] each) in a [B, width]
    batch: (mask_a, mask_b, future), bool [B, width]. Per row one random response block [s, e) of `block_length`
    (the last one possibly shorter); mask_a masks each block token with p = (1 - eps) 0.5 + eps, mask_b the other
    block tokens; `future` is [e, L), masked in both views."""
    device = prompt_lens.device
    pos = torch.arange(width, device=device)[None]  # [1, W]
    blocks = (lengths - prompt_lens + block_length - 1) // block_length  # [B]: ceil(R / b)
    n = (torch.rand(len(blocks), device=device) * blocks).long()  # U{0, ..., blocks - 1}
    start = (prompt_lens + n * block_length)[:, None]
    end = torch.minimum(start + block_length, lengths[:, None])
    block = (pos >= start) & (pos < end)
    m = torch.rand(block.shape, device=device) < (1 - eps) * MASK_RATIO + eps
    return block & m, block & ~m, (pos >= end) & (pos < lengths[:, None])


# ---- LoRA -----------------------------------------------------------------------------------------------------------


class LoRALinear(torch.nn.Module):
    """y = base(x) + (alpha / r) B A x, with A [r, in] (Kaiming-uniform, as PEFT) and B [out, r] zero-initialised,
    so an untrained adapter leaves the model as it was."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        w = base.weight
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        """The base layer with the adapter added into its weight."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Freeze `model` and wrap its Linear layers named in `targets` in trainable `LoRALinear`s; returns how many."""
    model.requires_grad_(False)
    wrapped = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not wrapped:
        raise ValueError(f"the model has no Linear layers named {targets} for LoRA")
    for name, module in wrapped:
        model.set_submodule(name, LoRALinear(module, rank, alpha))
    return len(wrapped)


def merge_lora(model: torch.nn.Module) -> None:
    """Replace every `LoRALinear` of `model` with its merged base layer."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        model.set_submodule(name, module.merged())


# ---- trajectories ---------------------------------------------------------------------------------------------------


def trajectories(
    model: str, prompts: list[list[int]], diffusion_config: dict, device: str = "auto", seed: int = 0
) -> Iterator[list[int]]:
    """The model's greedy answers (token ids) to `prompts` with leapserve's `dparallel` decoder, one per prompt in
    order, generated `GENERATE_CHUNK` at a time."""
    from leapserve.decoding import LLM, SamplingParams

    llm = LLM(
        model=model,
        decoder="dparallel",
        diffusion_config=diffusion_config,
        device=device,
        seed=seed,
        enforce_eager=True,
    )
    params = SamplingParams(max_tokens=diffusion_config["gen_length"], temperature=0)
    for i in range(0, len(prompts), GENERATE_CHUNK):
        for out in llm.generate(prompts[i : i + GENERATE_CHUNK], params, use_tqdm=False):
            yield list(out.outputs[0].token_ids)


def canvas(response: list[int], gen_length: int, eos: int) -> list[int]:
    """A generated answer as the `gen_length` tokens the decoder filled: cut after its first EOS, EOS-padded."""
    if eos in response:
        response = response[: response.index(eos) + 1]
    response = response[:gen_length]
    return response + [eos] * (gen_length - len(response))


def stored_trajectories(
    path: Path, prompts: list[list[int]], settings: dict, generate, eos: int, gen_length: int
) -> list[list[int]]:
    """The answers to `prompts` stored in `path` (JSONL of {"prompt_ids", "response_ids"}, in prompt order, with
    `settings` in a `.meta.json` beside it), generating the missing ones with `generate(prompts) -> iterator` and
    appending each as it comes."""
    meta = path.with_suffix(".meta.json")
    if meta.is_file() and json.loads(meta.read_text()) != settings:
        raise ValueError(f"{path} was generated with {meta.read_text()}, not {settings}; use another --work-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings))
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    complete = [line for line in lines if line.endswith("\n")]  # an interrupted write leaves a partial last line
    if len(complete) < len(lines):
        path.write_text("".join(complete))
    done = [json.loads(line) for line in complete]
    if len(done) > len(prompts) or any(d["prompt_ids"] != p for d, p in zip(done, prompts)):
        raise ValueError(f"{path} holds trajectories of other prompts; use another --work-dir")
    responses = [d["response_ids"] for d in done]
    todo = prompts[len(done) :]
    if not todo:
        return responses
    with open(path, "a") as f, tqdm(total=len(prompts), initial=len(done), desc="trajectories", unit="prompt") as bar:
        for prompt, response in zip(todo, generate(todo)):
            response = canvas(list(response), gen_length, eos)
            f.write(json.dumps({"prompt_ids": prompt, "response_ids": response}) + "\n")
            f.flush()
            responses.append(response)
            bar.update(1)
    if len(responses) < len(prompts):
        raise RuntimeError(f"got {len(responses)} trajectories for {len(prompts)} prompts")
    return responses


# ---- the trainer ----------------------------------------------------------------------------------------------------


@dataclass
class DParallelTraining(TrainConfig):
    """dParallel's optimizer settings (AdamW, wd 0.01, constant lr), where they differ from `TrainConfig`'s."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 16


@dataclass
class DParallelConfig:
    data: str = option(help='JSONL of {"prompt": str[, "response": str]}: prompts (and reference answers)')
    out: str = option(help="where the checkpoint is exported")
    model: str = option(help="the masked diffusion LM (config.json with diffusion_lm, e.g. from `train mdm`)")
    work_dir: str | None = option(None, "trajectories and training state, resumable (default: <out>.train)")
    gen_length: int = option(256, "tokens each trajectory fills after its prompt")
    block_length: int = option(32, "semi-autoregressive block: of the decoder, and the loss's active block")
    threshold: float = option(0.5, "the decoder's entropy threshold (nats) for the trajectories")
    rule: str = option("entropy", "the decoder's commit rule for the trajectories", choices=RULES)
    keep: str = option(
        "all", "all trajectories, or only those equal to the data's response", choices=("all", "correct")
    )
    beta: float = option(2.0, "weight of the certainty (entropy) term; 0: trajectory following only")
    entropy_temperature: float = option(0.5, "T_H: the entropy term's softmax temperature")
    lora_rank: int = option(0, "LoRA rank on q/k/v/o/gate/up/down (0: full fine-tuning)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, as dParallel)")
    train: TrainConfig = field(default_factory=DParallelTraining)

    def validate(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.lora_rank < 0 or self.entropy_temperature <= 0:
            raise ValueError("need --gen-length, --block-length >= 1, --lora-rank >= 0, --entropy-temperature > 0")
        self.train.validate()


def _collate(
    batch: list[TrainSequence], eos: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, W] EOS-filled past each row, attention mask [B, W], prompt lengths [B], lengths [B])."""
    lengths = torch.tensor([len(s.input_ids) for s in batch])
    width = int(lengths.max())
    ids = torch.full((len(batch), width), eos, dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = s.input_ids
    prompt_lens = torch.tensor([int(s.loss_mask.long().argmax()) for s in batch])  # first response position
    attention = (torch.arange(width)[None] < lengths[:, None]).long()
    return ids.to(device), attention.to(device), prompt_lens.to(device), lengths.to(device)


def train_dparallel(cfg: DParallelConfig) -> Path:
    """Generate (or reuse) the model's trajectories, train with certainty forcing, export to `cfg.out`."""
    from transformers import AutoConfig

    cfg.validate()
    device = cfg.train.torch_device
    source = resolve_model(cfg.model)
    spec = diffusion_spec(AutoConfig.from_pretrained(source))
    if spec is None:
        raise ValueError(f"{cfg.model} is not a masked diffusion LM (no diffusion_lm in config.json)")
    tokenizer = load_tokenizer(source)
    examples = read_examples(cfg.data, need_response=cfg.keep == "correct")
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.encode(ex["prompt"], add_special_tokens=False) for ex in examples]
    if eos is None or not all(prompts):
        raise ValueError("need a tokenizer with an EOS token and non-empty prompts")
    work = Path(cfg.work_dir or f"{cfg.out.rstrip('/')}.train")
    diffusion = {
        "gen_length": cfg.gen_length,
        "block_length": cfg.block_length,
        "rule": cfg.rule,
        "threshold": cfg.threshold,
    }
    settings = {"model": str(Path(source).resolve()), **diffusion}
    responses = stored_trajectories(
        work / TRAJECTORIES,
        prompts,
        settings,
        lambda todo: trajectories(str(source), todo, diffusion, cfg.train.device, cfg.train.seed),
        eos,
        cfg.gen_length,
    )
    correct = None
    if all("response" in ex for ex in examples):
        answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        correct = [a == ex["response"].strip() for a, ex in zip(answers, examples)]
    kept = [i for i in range(len(prompts)) if cfg.keep == "all" or correct[i]]
    if len(kept) < cfg.train.batch_size:
        raise ValueError(f"{len(kept)} trajectories kept, fewer than --batch-size {cfg.train.batch_size}")
    sequences = [
        TrainSequence(
            torch.tensor(prompts[i] + responses[i]),
            torch.arange(len(prompts[i]) + cfg.gen_length) >= len(prompts[i]),
            None,
        )
        for i in kept
    ]

    model = bidirectional(load_model(source, ModelConfig(model=cfg.model), device, torch.float32))
    torch.manual_seed(cfg.train.seed)
    alpha = cfg.lora_alpha or cfg.lora_rank
    adapted = add_lora(model, cfg.lora_rank, alpha) if cfg.lora_rank else 0

    def loss_fn(batch: list[TrainSequence]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, attention, prompt_lens, lengths = _collate(batch, eos, device)
        mask_a, mask_b, future = complementary_views(prompt_lens, lengths, ids.shape[1], cfg.block_length)
        views = torch.cat([ids.masked_fill(m | future, spec.mask_token_id) for m in (mask_a, mask_b)])  # [2B, W]
        logits_a, logits_b = model(input_ids=views, attention_mask=attention.repeat(2, 1)).logits.chunk(2)
        return certainty_forcing_loss(
            logits_a, logits_b, ids, mask_a, mask_b, cfg.beta, cfg.entropy_temperature, spec.logits_shift
        )

    run = {
        "model": settings["model"],
        "data": str(Path(cfg.data).resolve()),
        "trajectories": len(sequences),
        **diffusion,
        "keep": cfg.keep,
        "beta": cfg.beta,
        "entropy_temperature": cfg.entropy_temperature,
        "lora": [cfg.lora_rank, alpha],
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
    }
    width = max(len(s.input_ids) for s in sequences)
    stream = batches(sequences, cfg.train.batch_size, width, cfg.train.seed)
    result = train(model, loss_fn, stream, cfg.train, work, desc="dparallel", run=run)
    merge_lora(model)
    # served by default as its trajectories were decoded (--diffusion-config overrides)
    model.config.diffusion_lm = {**model.config.diffusion_lm, "decoding": diffusion}
    facts = {
        "base model": cfg.model,
        "beta": cfg.beta,
        "entropy temperature T_H": cfg.entropy_temperature,
        "fine-tuning": f"LoRA r={cfg.lora_rank} alpha={alpha:g} on {adapted} layers, merged" if adapted else "full",
        "loss block length": cfg.block_length,
        **{k: v for k, v in asdict(cfg.train).items() if k != "max_len"},
        "steps done": result.step,
        "final loss (mean of the last 50 steps)": result.loss,
    }
    accuracy = (
        f"; {sum(correct)} of them ({sum(correct) / len(correct):.1%}) equal the reference"
        if correct is not None
        else ""
    )
    data = (
        f"`{cfg.data}`: {len(prompts)} prompts answered by `{cfg.model}` itself with the dparallel decoder "
        f"({json.dumps(diffusion)}, greedy){accuracy}; trained on {len(sequences)} (`--keep {cfg.keep}`)."
    )
    summary = (
        f"`{cfg.model}` after dParallel certainty-forcing distillation (beta {cfg.beta:g}, T_H "
        f"{cfg.entropy_temperature:g}) on its own trajectories at entropy threshold {cfg.threshold:g}: it learns "
        "to be confident on many masked tokens at once, so threshold decoding commits more tokens per step. A "
        f"masked diffusion LM (`diffusion_lm` in config.json); serve it with `--decoder dparallel`."
    )
    card = model_card(
        "dParallel certainty-forced diffusion LM",
        summary=summary,
        command=command_line(),
        data=data,
        training=facts,
        metrics={"final train loss": result.loss, "steps": result.step},
    )
    out = export_diffusion_lm(cfg.out, model, tokenizer, card)
    print(json.dumps({"out": str(out), "steps": result.step, "loss": result.loss}), flush=True)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `dparallel` (as `leapserve train dparallel`)."""
    p = subparsers.add_parser(
        "dparallel",
        help="certainty-forcing distillation (dParallel) of a masked diffusion LM on its own trajectories",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_arguments(p, DParallelConfig)
    add_config_arguments(p.add_argument_group("training"), DParallelTraining, only=training_options(DParallelTraining))
    p.set_defaults(handler=lambda a: train_dparallel(config_from_args(DParallelConfig, a)))
