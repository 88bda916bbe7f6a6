"""Logits processors that let a server test fail or slow down chosen requests inside the engine.

Served with `leapserve serve --logits-processors fault_injection:fail_if_poisoned,fault_injection:delay_if_slow`
(with this directory on PYTHONPATH). A request opts in by starting its prompt token ids with a marker.
"""

from __future__ import annotations

import time

import torch

POISON_PREFIX = [49151, 49150, 49151]  # a prompt starting with these ids fails once it has POISON_AFTER tokens
POISON_AFTER = 2  # so a stream has started (and sent chunks) before the failure
SLOW_PREFIX = [49150, 49151, 49150]  # a prompt starting with these ids takes at least SLOW_SECONDS per token
SLOW_SECONDS = 0.02


def fail_if_poisoned(prompt_token_ids: list[int], output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    if prompt_token_ids[: len(POISON_PREFIX)] == POISON_PREFIX and len(output_token_ids) >= POISON_AFTER:
        raise RuntimeError("fault injection: poisoned request")
    return logits


def delay_if_slow(prompt_token_ids: list[int], output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    if prompt_token_ids[: len(SLOW_PREFIX)] == SLOW_PREFIX:
        time.sleep(SLOW_SECONDS)
    return logits
