"""`leapserve train dart`: DART-style silent-thought training, the CoT (teacher) and ST (student) pathways of one
model at once, CODI's self-distillation recipe.

Data: JSONL, one `{"question": str, "steps": [str, ...], "answer": str}` per line (raw text; the steps are joined
as they are, so each carries its own delimiter). Every piece is tokenized on its own, as the silent-thought decoder
joins them at serving time. The two pathways of an example:

    CoT: question + separator + steps[:-1] + answer_prompt + answer + EOS   (CODI drops the last step)
    ST:  question + separator + ST_1 ... ST_K + answer_prompt + answer + EOS

ST_j are K learned vectors (`SilentThought.embeddings`, `leapserve.decoding.silent_thought`) fed as input
embeddings, transformed by the REM: per-layer bottleneck adapters at the ST positions (`layer_adapter`), R Jacobi
refinements of the vectors from the final-norm hidden states at those positions (`jacobi`; training
back-propagates through the R passes), or nothing (`none`).

Loss: L = alpha CE_ST + gamma CE_CoT + beta KD_ans + lambda KD_ST, with
- CE_ST: mean next-token cross-entropy over the ST pathway's answer + EOS (the answer prompt is the server's);
- CE_CoT: the same over the CoT pathway's steps + answer prompt + answer + EOS (the teacher keeps generating);
- KD_ans: at the last token of the answer prompt in both pathways, for every decoder layer (hidden_states[1:], the
  last one after the final norm), smooth-L1(student, teacher) divided by the std of the teacher's vectors over the
  batch and hidden units, teacher detached; the mean over layers (CODI's code);
- KD_ST: the same distance between ST_j's hidden states and the CoT pathway's at the last token of step j (steps
  kept: all but the last; evenly spaced step boundaries when their count is not K; the separator's last token
  when no step is kept).
One forward runs both pathways (the CoT rows, then the ST rows of the batch): the CoT rows give CE_CoT with
gradient and the detached KD targets. Defaults alpha 1, gamma 1, beta 1, lambda 0 (CODI's GPT-2 weights);
`--beta 0 --gamma 0 --lam 0` trains the ST pathway on the answers alone ("pause tokens"), and the CoT rows are not
run at all.

Full fine-tuning, or LoRA (`--lora-rank R`) merged into the weights at export; the ST vectors and the REM are always
trained in full. The export is the base model's checkpoint format plus `silent_thought.safetensors` and the
`silent_thought` entry of config.json: serve it with `--decoder silent-thought`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args, option
from leapserve.decoding.config import ModelConfig
from leapserve.decoding.diffusion_lm import diffusion_spec
from leapserve.decoding.model_loader import load_model, load_tokenizer, resolve_model
from leapserve.decoding.silent_thought import (
    REM_MODES,
    REM_NORMS,
    SilentThought,
    SilentThoughtConfig,
    save_silent_thought,
    st_positions,
    text_ids,
)

from .checkpoint import command_line, model_card
from .data import TrainSequence, batches
from .dparallel import merge_lora
from .loop import TrainConfig, train
from .mdm import export_diffusion_lm, training_options
from .sft import causal_lm_loss, finetuning_fact

ST_INIT_NOISE = 0.02  # std of the noise added to the separator's embedding (the ST vectors' initialisation)

# ---- the layouts ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One pathway of one example, as token positions."""

    ids: list[int]  # the tokens; the ST positions hold a placeholder (their inputs are the ST vectors)
    targets: list[bool]  # the positions whose token is a cross-entropy target (predicted from the one before)
    kd_index: int  # the last token of the answer prompt: where KD_ans reads both pathways
    marks: list[int]  # CoT: the last token of each kept step (else of the separator); ST: the K ST positions


def pathway_ids(
    question: list[int],
    separator: list[int],
    middle: Sequence[list[int]],
    answer_prompt: list[int],
    answer: list[int],
    eos: int,
    middle_is_target: bool,
) -> Layout:
    """question + separator + the middle chunks + answer_prompt + answer + EOS. Targets: the middle, the answer
    prompt, the answer and EOS with `middle_is_target` (CoT), else the answer and EOS (ST). `marks`: each middle
    chunk's last position, or the separator's last one when there is no chunk."""
    if not answer_prompt:
        raise ValueError("the answer prompt must hold at least one token: KD reads its last one")
    ids = question + separator
    marks = []
    for chunk in middle:
        ids = ids + chunk
        marks.append(len(ids) - 1)
    if not marks:
        marks = [len(ids) - 1]
    reasoning_start = len(question) + len(separator)
    ids = ids + answer_prompt
    kd_index = len(ids) - 1
    ids = ids + answer + [eos]
    first_target = reasoning_start if middle_is_target else kd_index + 1
    targets = [i >= first_target for i in range(len(ids))]
    return Layout(ids, targets, kd_index, marks)


def cot_layout(
    question: list[int],
    separator: list[int],
    steps: Sequence[list[int]],
    answer_prompt: list[int],
    answer: list[int],
    eos: int,
) -> Layout:
    """The CoT (teacher) pathway: every step but the last (CODI), the whole continuation a target."""
    return pathway_ids(question, separator, list(steps)[:-1], answer_prompt, answer, eos, middle_is_target=True)


def st_layout(
    question: list[int],
    separator: list[int],
    num_thoughts: int,
    answer_prompt: list[int],
    answer: list[int],
    eos: int,
    placeholder: int,
) -> Layout:
    """The ST (student) pathway: K placeholder positions (`marks`) for the ST vectors; answer + EOS the targets."""
    middle = [[placeholder]] * num_thoughts
    return pathway_ids(question, separator, middle, answer_prompt, answer, eos, middle_is_target=False)


def step_alignment(num_boundaries: int, num_thoughts: int) -> list[int]:
    """For each ST token j < K, the step boundary (of `num_boundaries`, in order) it is aligned to: the j-th when
    the counts are equal, else evenly spaced, ceil((j + 1) m / K) - 1, so the last ST token meets the last one."""
    m, k = num_boundaries, num_thoughts
    return [((j + 1) * m + k - 1) // k - 1 for j in range(k)]


# ---- the losses -----------------------------------------------------------------------------------------------------


def distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """CODI's KD distance: per layer, smooth-L1 (beta 1, mean over the vectors and units) between the student's
    vectors [N, d] and the detached teacher's, divided by the std of the teacher's vectors (all N x d values,
    unbiased); the mean over the layers."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.detach().float()
        terms.append(F.smooth_l1_loss(s.float(), t) / t.std())
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0  # CE_ST
    gamma: float = 1.0  # CE_CoT
    beta: float = 1.0  # KD_ans
    lam: float = 0.0  # KD_ST

    @property
    def teacher(self) -> bool:
        """Whether the CoT pathway runs at all."""
        return bool(self.gamma or self.beta or self.lam)


@dataclass(frozen=True)
class Example:
    cot: Layout
    st: Layout


def _pad(layouts: Sequence[Layout], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets), [R, W] each, right-padded (a causal model never attends to what comes after)."""
    width = max(len(x.ids) for x in layouts)
    ids = torch.full((len(layouts), width), pad, dtype=torch.long)
    targets = torch.zeros(len(layouts), width, dtype=torch.bool)
    for row, x in enumerate(layouts):
        ids[row, : len(x.ids)] = torch.tensor(x.ids)
        targets[row, : len(x.ids)] = torch.tensor(x.targets)
    return ids.to(device), targets.to(device)


def _with_thoughts(embeds: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`embeds` [R, W, d] with the vectors z [B, K, d] at positions (rows, cols) ([B, K] each)."""
    return embeds.index_put((rows.flatten(), cols.flatten()), z.reshape(-1, z.shape[-1]).to(embeds.dtype))


def dart_loss(
    model: torch.nn.Module, st: SilentThought, batch: Sequence[Example], weights: LossWeights, pad: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of a batch and its terms (only those with a weight). `st` must be installed on `model`."""
    device = st.embeddings.device
    teacher = [ex.cot for ex in batch] if weights.teacher else []
    students = [ex.st for ex in batch]
    t, b = len(teacher), len(students)
    ids, targets = _pad(teacher + students, pad, device)
    rows = torch.arange(t, t + b, device=device)[:, None].expand(b, st.config.num_thoughts)  # [B, K]
    cols = torch.tensor([x.marks for x in students], device=device)  # [B, K]: the ST positions
    st_mask = torch.zeros_like(ids, dtype=torch.bool).index_put(
        (rows.flatten(), cols.flatten()), torch.tensor(True, device=device)
    )
    embeds = model.get_input_embeddings()(ids)  # [R, W, d]
    z0 = st.embeddings.expand(b, -1, -1)  # [B, K, d]
    z = z0
    if st.config.rem_mode == "jacobi":  # R passes of the student rows up to their last ST position, each refining z
        width = int(cols.max()) + 1
        for _ in range(st.config.jacobi_iterations):
            prefix = _with_thoughts(embeds[t:, :width], rows - t, cols, z)
            with st_positions(st_mask[t:, :width]):
                h = model.get_decoder()(inputs_embeds=prefix).last_hidden_state  # after the final norm
            z = st.refine(z0, h[rows - t, cols])
    with st_positions(st_mask):
        out = model(inputs_embeds=_with_thoughts(embeds, rows, cols, z), output_hidden_states=True)
    # `install` ran before the first output_hidden_states forward, so transformers' capture hooks (installed then)
    # come after the adapters': hidden_states show the adapted ST states
    layers = out.hidden_states[1:]
    parts = {}
    loss = weights.alpha * (ce_st := causal_lm_loss(out.logits[t:], ids[t:], targets[t:]))
    parts["ce_st"] = ce_st.item()
    if weights.gamma:
        loss = loss + weights.gamma * (ce_cot := causal_lm_loss(out.logits[:t], ids[:t], targets[:t]))
        parts["ce_cot"] = ce_cot.item()
    if weights.beta:
        kd_s = torch.tensor([x.kd_index for x in students], device=device)
        kd_t = torch.tensor([x.kd_index for x in teacher], device=device)
        trows = torch.arange(t, device=device)
        kd_ans = distill_loss([h[rows[:, 0], kd_s] for h in layers], [h[trows, kd_t] for h in layers])
        loss = loss + weights.beta * kd_ans
        parts["kd_ans"] = kd_ans.item()
    if weights.lam:
        k = st.config.num_thoughts
        aligned = torch.tensor(
            [[x.marks[i] for i in step_alignment(len(x.marks), k)] for x in teacher], device=device
        )  # [B, K]: the CoT positions the ST tokens are aligned to
        trows = torch.arange(t, device=device)[:, None].expand(t, k)
        kd_st = distill_loss(
            [h[rows, cols].flatten(0, 1) for h in layers], [h[trows, aligned].flatten(0, 1) for h in layers]
        )
        loss = loss + weights.lam * kd_st
        parts["kd_st"] = kd_st.item()
    return loss, parts


# ---- data -----------------------------------------------------------------------------------------------------------


def read_reasoning(path: str | Path) -> list[dict]:
    """The `{"question": str, "steps": [str, ...], "answer": str}` objects of a JSONL file."""
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            ok = isinstance(ex, dict) and isinstance(ex.get("question"), str) and isinstance(ex.get("answer"), str)
            ok = ok and isinstance(ex.get("steps"), list) and all(isinstance(s, str) for s in ex["steps"])
            if not ok:
                want = '{"question": str, "steps": [str, ...], "answer": str}'
                raise ValueError(f"{path}:{n}: expected {want}, got {line.strip()[:80]!r}")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def encode_reasoning(tokenizer, ex: dict, config: SilentThoughtConfig, eos: int) -> Example:
    """Both pathways of one example; each piece tokenized on its own (`text_ids`), as the decoder joins them."""
    q, sep = text_ids(tokenizer, ex["question"]), text_ids(tokenizer, config.separator)
    prompt = text_ids(tokenizer, config.answer_prompt)
    answer = text_ids(tokenizer, ex["answer"])
    steps = [text_ids(tokenizer, s) for s in ex["steps"]]
    return Example(
        cot_layout(q, sep, steps, prompt, answer, eos),
        st_layout(q, sep, config.num_thoughts, prompt, answer, eos, placeholder=eos),
    )


class _TokenizerAndThoughts:
    """What `export_diffusion_lm` calls `save_pretrained` on while its checkpoint is still a temporary directory:
    the tokenizer, then the silent-thought files, so the checkpoint appears whole or not at all."""

    def __init__(self, tokenizer, module: SilentThought, config: SilentThoughtConfig):
        self.tokenizer, self.module, self.config = tokenizer, module, config

    def save_pretrained(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)
        save_silent_thought(directory, self.module, self.config)


# ---- the trainer ----------------------------------------------------------------------------------------------------


@dataclass
class DARTTraining(TrainConfig):
    """DART's optimizer settings, where they differ from `TrainConfig`'s (CODI: wd 0.1, clip 2)."""

    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 2.0
    batch_size: int = 32


@dataclass
class DARTConfig:
    data: str = option(help='JSONL of {"question": str, "steps": [str, ...], "answer": str} (raw text)')
    out: str = option(help="where the checkpoint is exported")
    model: str = option(help="the base causal LM (a Llama checkpoint, e.g. from `train sft` on the CoT format)")
    work_dir: str | None = option(None, "training state, resumable (default: <out>.train)")
    num_thoughts: int = option(6, "K: silent-thought positions")
    separator: str = option("\n", "text between the question and the reasoning (steps, or ST positions)")
    answer_prompt: str = option(" The answer is:", "text before the answer; KD reads its last token")
    rem_mode: str = option(
        "layer_adapter", "the REM: per-layer adapters, Jacobi refinement, or none", choices=REM_MODES
    )
    rem_rank: int = option(64, "layer_adapter: bottleneck width")
    rem_layers: list[int] | None = option(None, "layer_adapter: decoder layers with an adapter (default: all)")
    rem_norm: str = option("rmsnorm", "layer_adapter: the adapter's input norm", choices=REM_NORMS)
    jacobi_iterations: int = option(0, "R: jacobi refinement passes (>= 1 with --rem-mode jacobi, else 0)")
    st_init: str = option(
        "separator",
        "the ST vectors' start: the separator's last embedding + noise, or small noise",
        choices=("separator", "random"),
    )
    alpha: float = option(1.0, "weight of CE on the ST pathway's answer")
    gamma: float = option(1.0, "weight of CE on the CoT pathway (steps, answer prompt, answer)")
    beta: float = option(1.0, "weight of KD at the answer prompt's last token (all layers)")
    lam: float = option(0.0, "weight of KD of ST token j to the end of CoT step j")
    lora_rank: int = option(0, "LoRA rank on q/k/v/o/gate/up/down, merged at export (0: full fine-tuning)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    train: TrainConfig = field(default_factory=DARTTraining)

    def silent_thought(self) -> SilentThoughtConfig:
        return SilentThoughtConfig(
            num_thoughts=self.num_thoughts,
            separator=self.separator,
            answer_prompt=self.answer_prompt,
            rem_mode=self.rem_mode,
            rem_rank=self.rem_rank,
            rem_layers=self.rem_layers,
            jacobi_iterations=self.jacobi_iterations,
            rem_norm=self.rem_norm,
        )

    def validate(self) -> None:
        self.silent_thought()  # raises on a bad K, REM mode or R
        if min(self.alpha, self.gamma, self.beta, self.lam) < 0 or not self.alpha or self.lora_rank < 0:
            raise ValueError("need --alpha > 0, --gamma, --beta, --lam >= 0 and --lora-rank >= 0")
        if not self.answer_prompt:
            raise ValueError("--answer-prompt must not be empty: the answer follows it, and KD reads its last token")
        self.train.validate()


def _check_pieces(tokenizer, cfg: DARTConfig) -> None:
    """The separator and answer prompt must be spelled in the model's vocabulary (not as unknown tokens)."""
    unk = tokenizer.unk_token_id
    for name, text in (("--separator", cfg.separator), ("--answer-prompt", cfg.answer_prompt)):
        if unk is not None and unk in text_ids(tokenizer, text):
            raise ValueError(f"{name} {text!r} has characters the tokenizer does not know")


def train_dart(cfg: DARTConfig) -> Path:
    """Train the CoT and ST pathways of `cfg.model` on `cfg.data` and export the model with its silent thought."""
    cfg.validate()
    device = cfg.train.torch_device
    st_config = cfg.silent_thought()
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (needed to end answers)")
    _check_pieces(tokenizer, cfg)
    raw = read_reasoning(cfg.data)
    examples = [encode_reasoning(tokenizer, ex, st_config, eos) for ex in raw]
    if len(examples) < cfg.train.batch_size:
        raise ValueError(f"{cfg.data}: {len(examples)} examples, fewer than --batch-size")
    model = load_model(source, ModelConfig(model=cfg.model), device, torch.float32)
    if diffusion_spec(model.config) is not None:
        raise ValueError(f"{cfg.model} is a masked diffusion LM (diffusion_lm in config.json), not a causal LM")
    torch.manual_seed(cfg.train.seed)
    tuning, lora_alpha = finetuning_fact(model, cfg.lora_rank, cfg.lora_alpha)
    hf = model.config
    st = SilentThought(st_config, hf.hidden_size, hf.num_hidden_layers).to(device)
    sep = text_ids(tokenizer, cfg.separator)
    if cfg.st_init == "separator" and sep:
        with torch.no_grad():
            start = model.get_input_embeddings().weight[sep[-1]]
            st.embeddings.copy_(start + ST_INIT_NOISE * torch.randn_like(st.embeddings))
    st.install(model)  # before any output_hidden_states forward: see dart_loss
    weights = LossWeights(cfg.alpha, cfg.gamma, cfg.beta, cfg.lam)
    trained = torch.nn.ModuleDict({"model": model, "silent_thought": st})  # what the loop trains and saves

    def loss_fn(batch: list[TrainSequence]) -> tuple[torch.Tensor, dict[str, float]]:
        return dart_loss(model, st, [examples[int(s.input_ids[0])] for s in batch], weights, eos)

    run = {
        "model": str(source),
        "data": str(Path(cfg.data).resolve()),
        "examples": len(examples),
        "silent_thought": st_config.to_dict(),
        "st_init": cfg.st_init,
        "weights": asdict(weights),
        "lora": [cfg.lora_rank, lora_alpha],
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
    }
    # the batches are drawn as every trainer's (`training.data.batches`), here over the examples' indices
    indices = [TrainSequence(torch.tensor([i]), torch.ones(1, dtype=torch.bool), None) for i in range(len(examples))]
    stream = batches(indices, cfg.train.batch_size, 1, cfg.train.seed)
    work = Path(cfg.work_dir or f"{cfg.out.rstrip('/')}.train")
    result = train(trained, loss_fn, stream, cfg.train, work, desc="dart", run=run)
    merge_lora(model)
    facts = {
        "base model": cfg.model,
        "loss weights (alpha CE_ST, gamma CE_CoT, beta KD_ans, lambda KD_ST)": (
            f"{cfg.alpha:g}, {cfg.gamma:g}, {cfg.beta:g}, {cfg.lam:g}"
        ),
        "silent thought": json.dumps(st_config.to_dict()),
        "ST initialisation": cfg.st_init,
        "silent-thought parameters": sum(p.numel() for p in st.parameters()),
        "fine-tuning": tuning,
        **{k: v for k, v in asdict(cfg.train).items() if k != "max_len"},
        "steps done": result.step,
        "final loss (mean of the last 50 steps)": result.loss,
    }
    arm = "pause tokens (answer CE only)" if not weights.teacher else "DART-style self-distillation (CODI's losses)"
    summary = (
        f"`{cfg.model}` with {cfg.num_thoughts} silent-thought positions (REM `{cfg.rem_mode}`) trained by {arm}: "
        "the model answers from learned vectors computed in the prompt's prefill instead of a generated chain of "
        "thought, and keeps its CoT pathway. Serve it with `--decoder silent-thought` (`silent_thought` in "
        "config.json, the vectors and REM in `silent_thought.safetensors`)."
    )
    n_steps = sum(max(len(ex["steps"]) - 1, 0) for ex in raw)
    data = (
        f"`{cfg.data}`: {len(examples)} examples; separator {cfg.separator!r}, answer prompt "
        f"{cfg.answer_prompt!r}; {n_steps} CoT steps kept in the teacher pathway (the last step of each dropped)."
    )
    card = model_card(
        "Silent-thought (DART-style) model",
        summary=summary,
        command=command_line(),
        data=data,
        training=facts,
        metrics={"final train loss": result.loss, "steps": result.step},
    )
    out = export_diffusion_lm(cfg.out, model, _TokenizerAndThoughts(tokenizer, st, st_config), card)
    print(json.dumps({"out": str(out), "steps": result.step, "loss": result.loss}), flush=True)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `dart` (as `leapserve train dart`)."""
    p = subparsers.add_parser(
        "dart",
        help="train silent thought (DART-style: CoT and ST pathways, CODI's self-distillation) into a causal LM",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_arguments(p, DARTConfig)
    add_config_arguments(p.add_argument_group("training"), DARTTraining, only=training_options(DARTTraining))
    p.set_defaults(handler=lambda a: train_dart(config_from_args(DARTConfig, a)))
