"""`leapserve serve --backend vllm`: the same command served by vLLM's engine, as a child process.

leapserve's engine config becomes a `vllm serve` command line: the model alias resolves to its local checkpoint,
`dtype auto` means what it means natively (float32 on CPU), and the speculative config maps onto vLLM's: `ngram`
and `draft_model` pass through, `fspad` is exported once into the cache in the EAGLE layout and served as `eagle`
by leapserve's vLLM plugin, with an EAGLE-2 tree (on vLLM's CPU build) through leapserve's tree worker. What vLLM
cannot do (static trees, trees on GPUs, the padded layout, leapserve's logits processors) is refused with a message;
adaptive speculation has no vLLM counterpart (vLLM drafts on every step). The child is stopped
with SIGTERM when this process is, and its exit status becomes ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from leapserve.decoding.args import option
from leapserve.decoding.config import EngineConfig, ModelConfig, SpeculativeConfig
from leapserve.decoding.diffusion_lm import diffusion_spec
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.model_loader import (
    cache_dir,
    load_model,
    local_or_shipped,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from leapserve.drafters.checkpoints import SHARED_WITH_TARGET, load_draft_model
from leapserve.training.checkpoint import export_checkpoint
from leapserve.training.export import dynamic_tree, export_eagle

logger = logging.getLogger(__name__)

VLLM_ENV = "LEAPSERVE_VLLM"  # the `vllm` executable to run, where it is not on PATH
LOCAL_VLLM = Path(".venv-vllm") / "bin" / "vllm"  # what `make setup-vllm` builds, in the working directory ...
CHECKOUT_VLLM = Path(__file__).resolve().parents[1] / LOCAL_VLLM  # ... or in the checkout leapserve runs from


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """vLLM's distribution flags, passed through (`--backend vllm` only)."""

    tensor_parallel_size: int = option(1, "vLLM backend: GPUs (or CPU ranks) each layer is split over")
    pipeline_parallel_size: int = option(1, "vLLM backend: pipeline stages the layers are split into")
    distributed_executor_backend: str | None = option(
        None, "vLLM backend: how ranks run; default: vLLM's choice", choices=("mp", "ray", "uni", "external_launcher")
    )

    @property
    def distributed(self) -> bool:
        return self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1


def find_vllm(explicit: str | None = None) -> str:
    """The `vllm` executable: `explicit`, else $LEAPSERVE_VLLM (either, when named, or an error), else on PATH, else
    ./.venv-vllm's, else the one `make setup-vllm` built in leapserve's checkout (an editable install run from another
    directory)."""
    for named, source in ((explicit, "--vllm-executable"), (os.environ.get(VLLM_ENV), f"${VLLM_ENV}")):
        if named:
            if _executable(named):
                return str(Path(named).resolve())
            raise ValueError(f"{source} {named}: not an executable file")
    for candidate in (shutil.which("vllm"), str(LOCAL_VLLM), str(CHECKOUT_VLLM)):
        if candidate and _executable(candidate):
            return str(Path(candidate).resolve())
    raise ValueError(
        "--backend vllm: no vLLM found (looked at PATH, ./.venv-vllm and "
        f"{CHECKOUT_VLLM.parents[1]}); install it with `pip install 'leapserve[vllm]'` on CUDA, or `make setup-vllm` "
        "on CPU"
    )


def _executable(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


TREE_WORKER = "leapserve.vllm_plugin.tree_runner.TreeCPUWorker"  # vLLM's CPU worker, verifying draft trees


def vllm_speculative_config(spec: SpeculativeConfig, target: str) -> dict:
    """leapserve's speculative config for the target `target` as vLLM's (`--speculative-config`); an `fspad` tree
    goes into the drafter's export (`leapserve_tree`), where leapserve's tree worker reads it."""
    if spec.tree is not None and not (spec.method == "fspad" and isinstance(spec.tree, dict)):
        raise ValueError(
            '--backend vllm: trees in vLLM are EAGLE-2 trees ({"depth", "top_k", "total_tokens"}) of an fspad '
            "drafter; give num_speculative_tokens for a chain, or serve this tree with --backend native"
        )
    if spec.layout != "packed":
        raise ValueError('--backend vllm: vLLM has no "padded" layout (it never pads drafts); drop "layout"')
    if spec.dtype != "auto":
        raise ValueError('--backend vllm: vLLM runs the drafter in the target\'s dtype; drop "dtype"')
    if spec.lookup is not None:
        raise ValueError('--backend vllm: a lookup chain in the drafter\'s trees is native only; drop "lookup"')
    if spec.adaptive:
        logger.info("--backend vllm: vLLM drafts on every step (leapserve's adaptive speculation is native only)")
    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_min": spec.prompt_lookup_min,
            "prompt_lookup_max": spec.prompt_lookup_max,
        }
    if spec.method == "draft_model":
        return {
            "method": "draft_model",
            "model": str(whole_draft(str(spec.model), target)),
            "num_speculative_tokens": k,
        }
    if spec.method == "fspad":
        tree = None if spec.tree is None else dynamic_tree(spec.tree)
        k = k if tree is None else tree["total_tokens"]
        export = eagle_export(str(spec.model), target, tree)
        return {"method": "eagle", "model": str(export), "num_speculative_tokens": k}
    raise ValueError(f"--backend vllm: drafter method {spec.method!r} has no vLLM counterpart")


def eagle_export(drafter: str, target: str, tree: dict | None = None) -> Path:
    """The FSPAD drafter (for `target`) in the EAGLE layout with `tree` as its `leapserve_tree`, exported once into
    the cache (keyed by the drafter's weights, the target, whose rows a reduced vocabulary's head takes, and the
    tree). An export given as the drafter is used as it is, or copied with the tree changed."""

    source = local_or_shipped(drafter)
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    is_export = "leapserve_fspad" in config
    if is_export and config.get("leapserve_tree") == tree:
        return source
    key = (source / "model.safetensors").read_bytes() + target.encode() + (json.dumps(tree).encode() if tree else b"")
    out = _export_dir(source, key)
    if (out / "config.json").is_file():
        return out
    if not is_export:
        return export_eagle(source, target, out, tree)
    partial = out.with_name(out.name + ".partial")  # renamed when complete: a crash leaves no half export behind
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    config = {k: v for k, v in config.items() if k != "leapserve_tree"} | ({"leapserve_tree": tree} if tree else {})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial.rename(out)
    return out


def whole_draft(draft: str, target: str) -> Path:
    """A draft model as vLLM's `draft_model` loads it: whole. One that stores only its own layers and takes the
    rest from its target (an AdaSPEC draft, `leapserve_shared_with_target`) is assembled once with `target`'s
    tensors and written into the cache, in fp32."""
    source = Path(resolve_model(draft))
    config = json.loads((source / "config.json").read_text())
    if not config.get(SHARED_WITH_TARGET):
        return source
    weights = b"".join(p.read_bytes() for p in sorted(source.glob("*.safetensors")))
    out = _export_dir(source, weights + target.encode())
    if not (out / "config.json").is_file():
        cpu = torch.device("cpu")
        target_model = load_model(target, ModelConfig(model=target), cpu, torch.float32)
        model = load_draft_model(str(source), target_model, cpu, torch.float32)
        tensors = {name: t.clone() for name, t in model.state_dict().items()}  # tied ones as copies of their own
        whole = {key: value for key, value in config.items() if key != SHARED_WITH_TARGET}
        card = f"# {source.name}, whole\n\n`{source}` with the tensors it shares with `{target}`, for vLLM.\n"
        export_checkpoint(out, tensors, whole, card, dtype=torch.float32)
    return out


def _export_dir(source: Path, contents: bytes) -> Path:
    """Where an export of `source` for vLLM lives in the cache, keyed by what it is made of."""
    return cache_dir() / "vllm-exports" / f"{source.resolve().name}-{hashlib.sha256(contents).hexdigest()[:16]}"


def vllm_command(
    config: EngineConfig,
    host: str,
    port: int,
    api_key: str | None,
    log_level: str,
    parallelism: Parallelism,
    executable: str,
) -> list[str]:
    """The `vllm serve` command line for this engine config."""
    mc = config.model
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    model_dir = str(resolve_model(mc.model))
    if config.decoder == "dparallel" or config.diffusion_config is not None or is_diffusion_lm(model_dir):
        raise ValueError(
            "--backend vllm does not serve masked diffusion LMs (--decoder dparallel): serve them with --backend "
            "native (docs/diffusion-models.md says what vLLM would need)"
        )
    cmd = [
        executable,
        "serve",
        model_dir,
        "--served-model-name",
        mc.served_model_name or mc.model,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        str(dtype).removeprefix("torch."),
        "--seed",
        str(config.seed),
        "--uvicorn-log-level",
        log_level,
        "--max-num-seqs",
        str(config.scheduler.max_num_seqs),
        "--max-num-batched-tokens",
        str(config.scheduler.max_num_batched_tokens),
        "--gpu-memory-utilization",
        str(config.cache.gpu_memory_utilization),
        "--tensor-parallel-size",
        str(parallelism.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(parallelism.pipeline_parallel_size),
    ]
    if parallelism.distributed_executor_backend:
        cmd += ["--distributed-executor-backend", parallelism.distributed_executor_backend]
    if mc.max_model_len:
        cmd += ["--max-model-len", str(mc.max_model_len)]
    if mc.trust_remote_code:
        cmd.append("--trust-remote-code")
    if mc.enforce_eager:
        cmd.append("--enforce-eager")
    if config.cache.kv_cache_tokens:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes(model_dir, config, dtype))]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += ["--middleware", "leapserve.vllm_plugin.openai_errors.OpenAIErrorShape"]
    speculative = config.speculative_config if config.decoder != "autoregressive" else None
    if speculative:
        spec = SpeculativeConfig.from_dict(speculative)
        if spec.tree is not None and device.type != "cpu":
            raise ValueError(
                "--backend vllm: trees in vLLM run on its CPU build (leapserve's tree worker extends its CPU model "
                "runner); on GPUs serve trees with --backend native"
            )
        cmd += ["--speculative-config", json.dumps(vllm_speculative_config(spec, model_dir))]
        if spec.tree is not None:
            cmd += ["--worker-cls", TREE_WORKER]
    return cmd


def is_diffusion_lm(model_dir: str) -> bool:
    path = Path(model_dir) / "config.json"
    return path.is_file() and diffusion_spec(json.loads(path.read_text())) is not None


def kv_cache_bytes(model_dir: str, config: EngineConfig, dtype) -> int:
    """`--kv-cache-tokens` in bytes of the target's KV cache."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    per_token = PagedKVCache.bytes_per_token(hf.num_hidden_layers, hf.num_key_value_heads, head_dim, dtype)
    return per_token * int(config.cache.kv_cache_tokens or 0)


def run_vllm(cmd: list[str]) -> None:
    """Run vLLM until it exits; SIGINT/SIGTERM here stop it (SIGTERM to the API server only: it stops its engine
    and workers itself). Exits with its status when it fails."""
    logger.info("serving with vLLM: %s", " ".join(cmd))
    child = subprocess.Popen(cmd)

    def stop(signum: int, frame: object) -> None:
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = child.wait()
    if status not in (0, -signal.SIGTERM):
        sys.exit(f"leapserve serve --backend vllm: vLLM exited with status {status}")
