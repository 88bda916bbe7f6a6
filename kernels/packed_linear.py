"""Linear layers whose weights are prepacked once for oneDNN, the CPU layout its GEMM streams at memory bandwidth.

A decode step at small batch reads every weight once and does little arithmetic with it, so its speed is the speed
at which the GEMM streams weights. `torch.nn.functional.linear` on a row-major fp32 weight reaches about half of
the machine's copy bandwidth on a 2-core AVX2 CPU; the same weights reordered by oneDNN (`mkldnn`) for a batch
hint of 32 reach it at every batch size up to 16 (BENCHMARKS.md, "The compiled model path"). Elsewhere (CUDA,
dtypes oneDNN does not pack) a `PackedLinear` is a plain linear. On a CPU with AVX-512's bf16 dot product but not
AMX, a compiled model's fp32 and bf16 weights are packed k-major instead, for the C++ op's own GEMM (`k_major_copy`),
which runs every row count there as fast as oneDNN or faster up to 128 rows and sums each row alike in any step
(docs/compile.md).

Under `torch.compile` the packed call is one custom op (`leapserve_cpu::packed_linear`, C++, `cpu_ops.py`), as the
packed tensor is opaque to the compiler; the op finds the packed copy by its plain weight's address, the weight being
a graph input (an integer handle would be baked into the graph as a constant and reused by every model sharing the
graph's code).
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_ops

PACK_BATCH_HINT = 32  # oneDNN picks its weight layout for this many rows; 1 would halve the speed at batch 16
_users: Counter[int] = Counter()  # layers using each packed copy (a weight shared by two models is packed once)


def _release(key: int) -> None:
    _users[key] -= 1
    if _users[key] == 0:
        del _users[key]
        cpu_ops.release_packed(key)


def cpu_computes_bf16() -> bool:
    """Whether oneDNN computes bf16 matmuls on this CPU (natively or, on AVX-512 without bf16 instructions, through
    its fp32 units)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can prepack this weight here: a CPU fp32 matrix (or bf16 where the CPU computes in bf16)."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_computes_bf16()))
    )


def is_k_major(weight: torch.Tensor) -> bool:
    """Whether a packable `weight` [out, in] is packed k-major for the op's own GEMM rather than for oneDNN: where
    the op computes every row count (`cpu_ops.k_major`) and is loaded in this process (a compiled model's runner
    loads it first; an eager model keeps oneDNN's copies and calls), for `out` divisible by 16 (bf16: `in` by 2)."""
    out_features, in_features = weight.shape
    shape_fits = out_features % 16 == 0 and in_features % _k_step(weight) == 0
    return shape_fits and cpu_ops.loaded() is not None and cpu_ops.k_major()


def _k_step(weight: torch.Tensor) -> int:
    return 2 if weight.dtype == torch.bfloat16 else 1  # bf16 in pairs of k: the dot product's


def k_major_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] in the layout of the op's k-major GEMM: per group of 64 outputs, for each k (bf16: each pair of
    k), the group's 64 weights ([N / 64, K, 64] or [N / 64, K / 2, 64, 2]; a last group of fewer outputs [K, N % 64]
    or [K / 2, N % 64, 2]), flat."""
    n, k = weight.shape
    step, full = _k_step(weight), n // 64 * 64
    groups = weight[:full].reshape(n // 64, 64, k // step, step).transpose(1, 2)
    last = weight[full:].reshape(n - full, k // step, step).transpose(0, 1)
    return torch.cat([groups.reshape(-1), last.reshape(-1)])


class PackedLinear(nn.Module):
    """`y = x @ weight.T + bias` with `weight` [out, in] prepacked where `packable`; `weight` itself is kept (the
    compiler reads its shape, and other modules may share it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.handle: int | None = None  # the plain weight's address: the op finds the packed copy by it
        self.packed: torch.Tensor | None = None  # the packed copy, one for every layer sharing the weight
        self.k_major = False  # packed for the op's own GEMM, not for oneDNN (`is_k_major`)
        self.through_op = False  # called eagerly, still through the compiled graphs' op (`run_through_op`)
        if packable(weight):
            self.handle = self.weight.data_ptr()
            entry = cpu_ops.packed_copy(self.handle)
            if entry is None:
                self.k_major = is_k_major(self.weight)
                if self.k_major:
                    self.packed = k_major_copy(self.weight)
                else:
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_BATCH_HINT)
                cpu_ops.register_packed(self.handle, self.packed, self.k_major)
            else:
                self.packed, self.k_major = entry
            _users[self.handle] += 1
            weakref.finalize(self, _release, self.handle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is None:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling() or self.through_op or self.k_major:  # k-major: no oneDNN copy
            return torch.ops.leapserve_cpu.packed_linear(x, self.weight, self.bias)
        # eager: the op directly, without the custom op's dispatch (~15 us a call, 2 ms a step at 121 calls)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def run_through_op(layer: PackedLinear) -> None:
    """Beside a model compiled on CPU, `layer` (an LM head applied to the logits rows outside the graph) called
    eagerly still runs the graphs' op (`cpu_ops.cpp`): a few rows then stream the weight at about the copy bandwidth,
    as inside the graph, and get the bits they get there. The op's ~15 us of dispatch a call is why a whole eager
    model does not."""
    if layer.handle is not None and cpu_ops.loaded() is not None:
        layer.through_op = True


def pack_linears(module: nn.Module) -> nn.Module:
    """Every `nn.Linear` inside `module` replaced, in place, by a `PackedLinear` of the same weights (where
    `packable`); returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and packable(child.weight):
            setattr(module, name, PackedLinear(child.weight, child.bias))
        else:
            pack_linears(child)
    return module
