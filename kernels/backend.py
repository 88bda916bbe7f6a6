"""Which implementation a kernel call runs: `LEAPSERVE_KERNEL_BACKEND` (auto | triton | reference), read per call."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import reference

_BACKENDS = ("auto", "triton", "reference")


def backend_for(device: torch.device) -> str:
    """'triton' or 'reference': what a call on tensors of `device` runs under the current environment."""
    choice = os.environ.get("LEAPSERVE_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"LEAPSERVE_KERNEL_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice


def implementation(device: torch.device, triton_module: str) -> ModuleType:
    if backend_for(device) == "reference":
        return reference
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 in the "
            "environment before leapserve's Triton kernels are first used"
        )
    return importlib.import_module(f"{__package__}.{triton_module}")
