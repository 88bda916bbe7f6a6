"""Persistent buffers that a step's index tensors (token ids, positions, slots, block tables, ...) are written into.

Building each from a Python list allocates a tensor per step and walks the list object by object; writing into a
kept buffer through its NumPy view does neither (1-6 us a tensor instead of 2-18 us on cpu-2c), and on a GPU
gives the forward inputs at fixed addresses, which a captured graph needs. A buffer grows (to the next power of two)
when a step needs more than it holds; the tensors handed out are views, valid until the same name's next `put`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class StepBuffers:
    def __init__(self, device: torch.device, capacity: int = 256):
        self.device = device
        self.on_host = device.type == "cpu"  # the host buffer is the step's tensor
        self.capacity = capacity
        self._host: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        self._device: dict[str, torch.Tensor] = {}

    def put(
        self, name: str, values: Sequence[int], dtype: torch.dtype, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """`values` (flat) as a tensor of `dtype` and `shape` (default 1-D) on the device, held in `name`'s buffer."""
        n = len(values)
        host, view = self._host.get(name, (None, None))
        if host is None or host.dtype != dtype or host.numel() < n:
            size = max(self.capacity, 1 << max(n - 1, 0).bit_length())
            host = torch.empty(size, dtype=dtype, pin_memory=self.device.type == "cuda")
            view = host.numpy()
            self._host[name] = (host, view)
            if not self.on_host:
                self._device[name] = torch.empty(size, dtype=dtype, device=self.device)
        assert view is not None
        view[:n] = values
        out = host[:n]
        if not self.on_host:
            out = self._device[name][:n].copy_(out)  # blocking: the host buffer is rewritten next step
        return out if shape is None else out.view(shape)
