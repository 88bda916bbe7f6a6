"""leapserve inside vLLM: a `vllm.general_plugins` entry point that vLLM calls in each of its processes (API server,
engine core, workers). It registers leapserve's drafter architectures with vLLM's model registry, so that a
drafter exported with `leapserve train export-eagle` serves with plain `vllm serve TARGET --speculative-config
'{"method": "eagle", "model": EXPORT, "num_speculative_tokens": K}'`; and, where the environment asks for it
(`LEAPSERVE_VLLM_CPU_ATTENTION=leapserve`), routes vLLM's CPU attention through leapserve's kernel. On GPUs,
leapserve's Triton kernel is vLLM's `CUSTOM` attention backend, chosen with `--attention-backend CUSTOM`.

Nothing here is imported by leapserve's own engine; vLLM is imported only inside `register`.
"""

from __future__ import annotations

import os

from leapserve.drafters.fspad_model import FSPAD_EAGLE_ARCHITECTURE

_registered = False


def register() -> None:
    """Register leapserve's architectures with vLLM (idempotent: vLLM may call it more than once per process)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(
        AttentionBackendEnum.CUSTOM, "leapserve.vllm_plugin.triton_attention.LeapserveTritonAttentionBackend"
    )
    if os.environ.get("LEAPSERVE_VLLM_CPU_ATTENTION") == "leapserve":
        register_backend(
            AttentionBackendEnum.CPU_ATTN, "leapserve.vllm_plugin.cpu_attention.LeapserveCPUAttentionBackend"
        )
    if FSPAD_EAGLE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            FSPAD_EAGLE_ARCHITECTURE, "leapserve.vllm_plugin.fspad_eagle:EagleFSPADLlamaForCausalLM"
        )
    _registered = True
