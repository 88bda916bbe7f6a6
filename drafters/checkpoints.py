"""Loading drafter checkpoints: draft causal LMs (`draft_model`) and FSPAD feature drafters (`fspad`).

A draft checkpoint whose config.json lists tensor names under `leapserve_shared_with_target` (AdaSPEC drafters share
the target's embeddings and LM head) stores only its own weights; those tensors are the target's (same objects).
An FSPAD checkpoint is a directory of config.json and model.safetensors, in leapserve's layout or the EAGLE one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from leapserve.decoding.config import ModelConfig
from leapserve.decoding.model_loader import load_model, local_or_shipped, resolve_model

from .fspad_model import FSPADConfig, FSPADModel, from_eagle_layout

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SHARED_WITH_TARGET = "leapserve_shared_with_target"
DRAFTER_TYPE = "fspad"  # config.json's "leapserve_drafter" in leapserve's FSPAD layout


def assemble_draft(
    config: PretrainedConfig,
    weights: dict[str, torch.Tensor],
    target: torch.nn.Module,
    shared: list[str],
    dtype: torch.dtype,
) -> torch.nn.Module:
    """A causal LM of `config` holding `weights`, whose `shared` parameters are `target`'s own (same objects)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device, all replaced below; buffers (rotary) real
        draft = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keys = draft.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    if keys.unexpected_keys or set(keys.missing_keys) != set(shared):
        raise ValueError(
            f"the draft's weights do not match its config: missing "
            f"{sorted(set(keys.missing_keys) - set(shared))}, unexpected {keys.unexpected_keys}, "
            f"shared with the target {shared}"
        )
    for name in shared:
        try:
            tensor = target.get_parameter(name)
        except AttributeError as e:
            raise ValueError(f"the draft shares {name!r} with the target, which has no such parameter") from e
        expected = draft.get_parameter(name)
        if tensor.shape != expected.shape or tensor.dtype != dtype:
            raise ValueError(
                f"the draft's {name} is {tuple(expected.shape)} {dtype}, the target's "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        module, _, attr = name.rpartition(".")
        setattr(draft.get_submodule(module), attr, tensor)
    return draft


def load_draft_model(model: str, target: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Load a draft checkpoint in eval mode; the tensors it lists under `SHARED_WITH_TARGET` are `target`'s own."""
    source = resolve_model(model)
    config_path = Path(source) / "config.json"
    shared = json.loads(config_path.read_text()).get(SHARED_WITH_TARGET) if config_path.is_file() else None
    if not shared:
        return load_model(source, ModelConfig(model=model), device, dtype)
    from transformers import AutoConfig

    weights = {}
    for path in sorted(Path(source).glob("*.safetensors")):
        weights.update(load_file(str(path), device=str(device)))
    try:
        draft = assemble_draft(AutoConfig.from_pretrained(source), weights, target, shared, dtype)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return draft.to(device).eval()


def load_fspad(path: str | Path, device: torch.device, dtype: torch.dtype) -> FSPADModel:
    """An FSPAD checkpoint directory (`config.json` + `model.safetensors`): as `leapserve train fspad` writes it,
    or exported to the EAGLE layout by `leapserve train export-eagle`."""
    path = local_or_shipped(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"FSPAD drafter {path}: needs config.json and model.safetensors (train one with `leapserve train fspad`)"
        )
    raw = json.loads(config_file.read_text())
    if raw.get("leapserve_drafter") == DRAFTER_TYPE:
        config, state = FSPADConfig.from_dict(raw), load_file(str(weights))
    elif "leapserve_fspad" in raw:
        config, state = from_eagle_layout(load_file(str(weights)), raw)
    else:
        raise ValueError(
            f"{path} is not an FSPAD drafter checkpoint (its config.json has neither "
            f'"leapserve_drafter": "{DRAFTER_TYPE}" nor "leapserve_fspad")'
        )
    model = FSPADModel(config)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
