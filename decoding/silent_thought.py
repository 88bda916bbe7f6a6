"""Silent thought (DART-style): K learned vectors stand in for a chain of thought, computed in the prompt's prefill.

The ST pathway of a question is `Q ⊕ separator ⊕ ST_1 … ST_K ⊕ answer_prompt`, the answer decoded after it. The K
positions take `SilentThought.embeddings` instead of token embeddings, and a Reasoning Evolvement Module (REM)
transforms them:

* `layer_adapter`: after each chosen decoder layer, `h <- h + up(gelu(down(norm(h))))` at the ST positions only (a
  forward hook reading the positions from `st_positions`); `up` starts at zero, so an untrained REM is the identity.
* `jacobi`: the ST positions are run R more times, `z_{t+1} = z_0 + mlp(h_last_t)` (`refine`), `h_last_t` the
  final-norm hidden states at the ST positions when they held `z_t`.
* `none`: the vectors alone (pause tokens).

Checkpoint: a transformers checkpoint directory whose config.json has `"silent_thought": {...}` (a
`SilentThoughtConfig`) and whose `silent_thought.safetensors` holds this module's state dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

CONFIG_KEY = "silent_thought"  # in config.json
WEIGHTS = "silent_thought.safetensors"
REM_MODES = ("layer_adapter", "jacobi", "none")
REM_NORMS = ("rmsnorm", "layernorm")
REASONING = ("st", "cot", "direct")
MAX_THOUGHTS = 256


@dataclass(frozen=True)
class SilentThoughtConfig:
    num_thoughts: int  # K
    separator: str  # text after the question, e.g. "\n"
    answer_prompt: str  # text after the ST positions (or the separator, `direct`), e.g. " The answer is:"
    rem_mode: str = "layer_adapter"
    rem_rank: int = 64  # layer_adapter bottleneck width
    rem_layers: list[int] | None = None  # layer_adapter: decoder layers with an adapter; None: every layer
    jacobi_iterations: int = 0  # R: jacobi re-runs of the ST positions (>= 1 for jacobi, 0 otherwise)
    reasoning: str = "st"  # the pathway of a request that names none: st | cot | direct
    rem_norm: str = "rmsnorm"  # layer_adapter's norm: rmsnorm | layernorm

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"silent_thought: {msg}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(
            is_int(self.num_thoughts) and 1 <= self.num_thoughts <= MAX_THOUGHTS,
            f"num_thoughts must be an integer in [1, {MAX_THOUGHTS}], got {self.num_thoughts!r}",
        )
        check(isinstance(self.separator, str), f"separator must be a string, got {self.separator!r}")
        check(isinstance(self.answer_prompt, str), f"answer_prompt must be a string, got {self.answer_prompt!r}")
        check(self.rem_mode in REM_MODES, f"rem_mode must be one of {REM_MODES}, got {self.rem_mode!r}")
        check(is_int(self.rem_rank) and self.rem_rank >= 1, f"rem_rank must be an integer >= 1, got {self.rem_rank!r}")
        check(
            self.rem_layers is None
            or (
                isinstance(self.rem_layers, list)
                and len(self.rem_layers) > 0
                and all(is_int(i) and i >= 0 for i in self.rem_layers)
                and len(set(self.rem_layers)) == len(self.rem_layers)
            ),
            f"rem_layers must be null or a non-empty list of distinct layer indices >= 0, got {self.rem_layers!r}",
        )
        check(
            is_int(self.jacobi_iterations) and self.jacobi_iterations >= 0,
            f"jacobi_iterations must be an integer >= 0, got {self.jacobi_iterations!r}",
        )
        check(
            (self.rem_mode == "jacobi") == (self.jacobi_iterations >= 1),
            f"rem_mode jacobi needs jacobi_iterations >= 1, and only it takes any (rem_mode {self.rem_mode!r}, "
            f"jacobi_iterations {self.jacobi_iterations})",
        )
        check(self.reasoning in REASONING, f"reasoning must be one of {REASONING}, got {self.reasoning!r}")
        check(self.rem_norm in REM_NORMS, f"rem_norm must be one of {REM_NORMS}, got {self.rem_norm!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SilentThoughtConfig:
        if not isinstance(d, dict):
            raise ValueError(f"silent_thought must be an object, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"silent_thought: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        missing = {"num_thoughts", "separator", "answer_prompt"} - set(d)
        if missing:
            raise ValueError(f"silent_thought: missing keys {sorted(missing)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers that get an adapter (layer_adapter), checked against the model's `num_layers`."""
        if self.rem_mode != "layer_adapter":
            return []
        layers = list(range(num_layers)) if self.rem_layers is None else list(self.rem_layers)
        if any(i >= num_layers for i in layers):
            raise ValueError(f"silent_thought: rem_layers {layers} exceed the model's {num_layers} layers")
        return layers

    def structure(self) -> tuple:
        """The fields that shape `SilentThought`'s parameters."""
        return (self.num_thoughts, self.rem_mode, self.rem_rank, self.rem_layers, self.rem_norm)


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` as tokens on its own, without special tokens: how the separator and answer prompt join a prompt."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


_st_mask: ContextVar[torch.Tensor | None] = ContextVar("leapserve_st_mask", default=None)


@contextmanager
def st_positions(mask: torch.Tensor) -> Iterator[None]:
    """Within this block, installed REM hooks act where `mask` (bool, the hidden states' leading shape: `[B, L]`, or
    `[1, T]` in the engine's packed forward) is true."""
    token = _st_mask.set(mask)
    try:
        yield
    finally:
        _st_mask.reset(token)


class LayerAdapter(nn.Module):
    """`h + up(gelu(down(norm(h))))` over `[n, d]`; `up` is zero at first (the identity)."""

    def __init__(self, d_model: int, rank: int, norm: str):
        super().__init__()
        self.norm: nn.Module = nn.RMSNorm(d_model, eps=1e-6) if norm == "rmsnorm" else nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(self.norm(h))))


class SilentThought(nn.Module):
    def __init__(self, config: SilentThoughtConfig, d_model: int, num_layers: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.embeddings = nn.Parameter(torch.randn(config.num_thoughts, d_model) * 0.02)  # [K, d]
        self.adapters = nn.ModuleDict(
            {str(i): LayerAdapter(d_model, config.rem_rank, config.rem_norm) for i in config.layers(num_layers)}
        )
        # CODI's projection: Linear, GELU, Linear, LayerNorm
        self.jacobi: nn.Module | None = None
        if config.rem_mode == "jacobi":
            self.jacobi = nn.Sequential(
                nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
            )

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        """Forward hooks on the model's decoder layers (`model.model.layers[i]`, through `get_decoder()`) applying the
        adapters at the `st_positions` in effect; returns their handles (to remove them)."""
        if not self.adapters:
            return []
        get_decoder = getattr(model, "get_decoder", None)
        layers = cast(nn.ModuleList, (get_decoder() if callable(get_decoder) else model).layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"silent_thought: built for {self.num_layers} layers, the model has {len(layers)}")
        return [layers[int(i)].register_forward_hook(self._hook(adapter)) for i, adapter in self.adapters.items()]

    @staticmethod
    def _hook(adapter: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
            mask = _st_mask.get()
            if mask is None:
                return None
            h = output[0] if isinstance(output, tuple) else output  # [B, L, d]
            if mask.shape != h.shape[:-1]:
                raise ValueError(f"st_positions mask {tuple(mask.shape)} does not match hidden states {tuple(h.shape)}")
            rows = mask.nonzero(as_tuple=True)
            h = h.index_put(rows, adapter(h[rows]))
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def refine(self, z0: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
        """Jacobi: the next ST inputs `z0 + mlp(h_last)`, over `[..., K, d]` (`z0`: the learned vectors,
        `h_last`: final-norm hidden states at the ST positions)."""
        if self.jacobi is None:
            raise ValueError(f"silent_thought: refine needs rem_mode jacobi, not {self.config.rem_mode!r}")
        return z0 + self.jacobi(h_last)


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p / "config.json"


def _replace_atomically(path: Path, write) -> None:
    """`write(tmp)`, then rename the temporary file onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_silent_thought(directory: str | os.PathLike, module: SilentThought, config: SilentThoughtConfig) -> None:
    """Add `module` and `config` to the transformers checkpoint in `directory`: `silent_thought.safetensors`, then
    the `silent_thought` entry of config.json (each written to a temporary file and renamed)."""
    out = Path(directory)
    config_path = out / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{out} is not a checkpoint directory (no config.json); save the base model first")
    if config.structure() != module.config.structure():
        raise ValueError(f"silent_thought: the module was built for {module.config}, not {config}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _replace_atomically(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    hf = json.loads(config_path.read_text())
    hf[CONFIG_KEY] = config.to_dict()
    _replace_atomically(config_path, lambda tmp: tmp.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n"))


def load_silent_thought(
    path: str | os.PathLike, d_model: int, num_layers: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[SilentThoughtConfig, SilentThought] | None:
    """The silent-thought config and module (eval mode, on `device` in `dtype`) of the checkpoint at `path` (its
    directory or its config.json); None when config.json has no `silent_thought`."""
    config_path = _config_path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (silent thought needs a local checkpoint directory)")
    entry = json.loads(config_path.read_text()).get(CONFIG_KEY)
    if entry is None:
        return None
    config = SilentThoughtConfig.from_dict(entry)
    weights = config_path.parent / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: config.json has {CONFIG_KEY!r} but the weights are not there")
    module = SilentThought(config, d_model, num_layers)
    state = load_file(str(weights))
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match its config {config}: {e}") from e
    return config, module.to(device=device, dtype=dtype).eval()
