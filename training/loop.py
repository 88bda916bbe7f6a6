"""The training loop every trainer shares: AdamW over a loss callable, linear warmup then a constant or cosine-decayed
learning rate, gradient clipping, a progress bar, and resumable checkpoints.

The state (`out_dir/train_state.pt`: the trainable parameters, optimizer, scheduler, step and RNG states) is written
atomically every `checkpoint_every` steps and at the end. When it exists, `train` resumes from it and skips the
batches the finished steps consumed, so an interrupted run ends with the same weights as an uninterrupted one
(given a deterministic batch iterator, e.g. one seeded like `training.data.batches`).
Frozen parameters (say embeddings shared with the target) are not saved: the caller rebuilds them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from leapserve.decoding.args import option
from leapserve.decoding.config import DEVICES, DTYPES
from leapserve.decoding.model_loader import resolve_device, resolve_dtype

STATE_FILE = "train_state.pt"
SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.1  # the cosine schedule ends at this fraction of the peak learning rate

# A loss callable returns the scalar loss, or the loss and extra numbers to show in the progress bar.
LossFn = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainConfig:
    """The optimizer and run settings of both trainers; each trainer's own defaults are a subclass of this."""

    steps: int = option(2000, "optimizer steps")
    lr: float = option(3e-4, "peak learning rate (reached after the warmup)")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only (not on norms and biases)")
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW defaults, as the AdaSPEC scripts (HF Trainer) use
    warmup_steps: int = option(0, "linear warmup steps, then the --lr-schedule")
    lr_schedule: str = option(
        "constant", "after the warmup: constant, or cosine decay to a tenth of --lr at the last step", choices=SCHEDULES
    )
    decay_steps: int | None = option(
        None, "cosine: decay over the last N steps only, the peak held before them (default: all after the warmup)"
    )
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping")
    batch_size: int = option(8, "sequences per step")
    max_len: int = option(512, "tokens per sequence; longer ones are cut")
    checkpoint_every: int = option(200, "steps between resumable training states")
    seed: int = option(0, "initialisation, data order and evaluation")
    device: str = option("auto", "where training runs", choices=DEVICES)
    dtype: str = option(
        "auto", "compute dtype; auto: bfloat16 autocast on CUDA, float32 on CPU (weights stay float32)", choices=DTYPES
    )

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("need lr > 0, warmup_steps >= 0, grad_clip >= 0 and weight_decay >= 0")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.decay_steps is not None and self.lr_schedule != "cosine":
            raise ValueError("--decay-steps needs --lr-schedule cosine: a constant rate has no decay to shorten")
        if self.decay_steps is not None and not 1 <= self.decay_steps <= self.steps:
            raise ValueError(f"--decay-steps must be in [1, --steps], got {self.decay_steps}")

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) as a fraction of `lr`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        start = self.warmup_steps if self.decay_steps is None else max(self.warmup_steps, self.steps - self.decay_steps)
        span = max(1, self.steps - 1 - start)
        progress = min(1.0, max(0, step - start) / span)
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward and loss when the compute dtype is not float32."""
        device = self.torch_device
        dtype = resolve_dtype(self.dtype, device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)


@dataclass
class TrainResult:
    step: int  # steps done in total (a resumed run counts the earlier ones)
    loss: float | None  # mean loss of the last 50 steps; None if no step ran
    seconds: float  # wall time of this run


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = _trainable(model).values()
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    cfg: TrainConfig,
    run: dict,
    recent: list[float],
) -> None:
    """Write the training state atomically (temp file + rename)."""
    state = {
        "step": step,
        "model": {n: p.detach().cpu() for n, p in _trainable(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "config": asdict(cfg),
        "run": run,
        "recent_losses": recent,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run: dict,
) -> tuple[int, list[float]]:
    """Restore a state written by `_save_state` for the same `run` settings; return its step and recent losses."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    params = _trainable(model)
    changed = {k: (state["run"].get(k), v) for k, v in run.items() if state["run"].get(k) != v}
    if set(state["model"]) != set(params) or changed:
        what = f"settings changed, (was, now): {changed}" if changed else "other trainable parameters"
        raise ValueError(
            f"{path} was written for a different run ({what}); delete it or pick another directory to start over"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["model"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["recent_losses"]


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterator[Any],
    cfg: TrainConfig,
    out_dir: str | Path,
    desc: str = "training",
    run: dict | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `loss_fn(batch)` over `batches`, resuming from `out_dir` if it holds a
    state written with the same `run` settings (what must not change between an interruption and its resumption,
    besides the trainable parameters' names). `model` must already be on its device; only its parameters with
    `requires_grad` are trained."""
    run = run or {}
    cfg.validate()
    path = Path(out_dir) / STATE_FILE
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.lr_factor(s))
    torch.manual_seed(cfg.seed)
    step, recent = _load_state(path, model, optimizer, scheduler, run) if path.is_file() else (0, [])
    batches = itertools.islice(batches, step, None)  # the batches the finished steps consumed
    params = list(_trainable(model).values())
    model.train()
    start = time.perf_counter()
    with tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc=desc, unit="step", dynamic_ncols=True) as bar:
        while step < cfg.steps:
            batch = next(batches)
            with cfg.autocast():
                out = loss_fn(batch)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}; lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            recent = (recent + [loss.item()])[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", **{k: f"{v:.3g}" for k, v in extra.items()})
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(path, model, optimizer, scheduler, step, cfg, run, recent)
    model.eval()
    mean = sum(recent) / len(recent) if recent else None
    return TrainResult(step, mean, time.perf_counter() - start)
