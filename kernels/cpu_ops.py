"""A compiled CPU model's two opaque ops in C++ (`cpu_ops.cpp`), so that inductor's C++ wrapper runs a step with no
Python between its kernels.

    leapserve_cpu::packed_linear(x, weight, bias)         F.linear through weight's oneDNN-packed copy (a few rows:
                                                          its own loop over the plain weight)
    leapserve_cpu::paged_attention(q, k, v, layer, scale) one layer's K/V write and attention over the paged cache

The extension is built once per source version with the C++ compiler inductor itself needs (about 35 s on a 2-core
machine) and cached under the directory `load` is given. What the ops read beyond their tensor arguments is mirrored
into C++ from Python: the packed weights (`register_packed` / `release_packed`, which `packed_linear.py` calls) and
the step being run (`push_step` / `pop_step` around each forward: the caches, slot mapping and
`reference.AttentionPlan`, which Python still plans once per step).

The C++ attention runs fp32 and bf16 sequences with at most `reference.BATCHED_MAX_QUERIES` queries (decoding,
verifying draft trees) through its own loops, in fp32 as SDPA computes bf16, which read K/V straight from the paged
cache (SDPA needs them gathered into a padded batch first, three times the memory traffic) and give each query row
the same bits in any step; longer ones (prefill) and fp16 run the same ATen calls as `reference.attend`, in the same
order, with the same values.
`LEAPSERVE_CPU_ATTENTION=sdpa` sends everything the reference's way. tests/test_cpu_ops.py sweeps both against the
reference and the float64 oracle.

The C++ linear runs up to `few_rows(dtype)` fp32 or bf16 rows (12 fp32 or 4 bf16 ones with AVX-512, else 3: decoding
a few sequences, verifying small draft trees) through its own loop, which streams the plain row-major weight at about
the copy bandwidth where oneDNN's packed GEMM reads it at about half of it, and sums each row alike in any step (bf16
in fp32, rounded once). Where the CPU has AMX, bf16 rows up to 16 go through its tile multiply instead, over the same
plain weight, at about the same cost for 1 row as for 16 (a weight's K divisible by 32 and N by 16): `own_rows`.
More rows, and other dtypes, go to oneDNN. Where the CPU has AVX-512's bf16 dot product but not AMX (`k_major`), an
fp32 or bf16 weight packed once the extension is loaded (a compiled model's) is packed k-major for the C++ linear
instead of for oneDNN, and every row count goes through it: a row gets the same bits in a step of any size, prefill
included (N divisible by 16; bf16: K by 2).
`LEAPSERVE_CPU_GEMV=onednn` sends every row to oneDNN (a k-major weight to ATen's linear over the plain weight).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from .attention_step import AttentionStep

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# Built for this CPU (its vector units; the build is cached per CPU), with OpenMP for `at::parallel_for`, which
# runs on torch's own OpenMP runtime (the one libgomp already loaded).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
NATIVE_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # caches whose short sequences the own attention takes
_module: ModuleType | None = None
_lock = threading.Lock()
# plain weight's address -> its packed copy, and whether that is k-major (`register_packed`)
_packed: dict[int, tuple[torch.Tensor, bool]] = {}


def load(build_root: Path) -> ModuleType:
    """The built extension (its ops registered with torch), building it under `build_root` on first use."""
    global _module
    with _lock:
        if _module is None:
            from torch.utils.cpp_extension import load as build

            digest = hashlib.sha256(
                SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode() + _cpu_features()
            ).hexdigest()[:12]
            name = f"leapserve_cpu_ops_{digest}"
            directory = build_root / name
            directory.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(directory)
            if not any(directory.glob(f"{name}*.so")):
                logger.info("building leapserve's C++ CPU ops (once; cached in %s) ...", directory)
            try:
                module = build(
                    name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory)
                )
            except (RuntimeError, OSError) as e:
                raise RuntimeError(
                    f"building leapserve's C++ CPU ops failed ({e}); a compiled CPU model needs a C++ compiler "
                    "(as torch.compile's inductor does): install one, or run eagerly with --enforce-eager"
                ) from e
            torch.library.register_fake("leapserve_cpu::packed_linear", _packed_linear_shape)
            torch.library.register_fake("leapserve_cpu::paged_attention", _paged_attention_shape)
            # inductor's C++ wrapper calls the ops' C shims, which the graphs it builds find among global symbols
            ctypes.CDLL(module.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
            module.set_native_attention(_choice_from_env("LEAPSERVE_CPU_ATTENTION", "native", "sdpa"))
            module.set_native_gemv(_choice_from_env("LEAPSERVE_CPU_GEMV", "native", "onednn"))
            _module = module  # from here on, weights packed register themselves; those packed before, now
            for key, (packed, is_k_major) in _packed.items():
                module.register_packed(key, packed, is_k_major)
    return _module


# the ops' C functions (cpu_ops.cpp) with inductor's C-shim ABI: its C++ wrapper calls them without the dispatcher
C_SHIMS = {
    "packed_linear": "AOTITorchError aoti_torch_cpu_packed_linear(AtenTensorHandle x, AtenTensorHandle weight, "
    "AtenTensorHandle* bias, AtenTensorHandle* ret0)",
    "paged_attention": "AOTITorchError aoti_torch_cpu_paged_attention(AtenTensorHandle q, AtenTensorHandle k, "
    "AtenTensorHandle v, int64_t layer, double scale, AtenTensorHandle* ret0)",
}


class CShims(dict):
    """inductor's `aot_inductor.custom_ops_to_c_shims` (op -> its C declaration) for `declarations` (op name -> C
    declaration). Pickled by those strings: inductor's cache key pickles its configuration, where an op itself would
    not pickle and would turn the cache off."""

    def __init__(self, declarations: dict[str, str]):
        super().__init__({getattr(torch.ops.leapserve_cpu, name).default: [d] for name, d in declarations.items()})
        self.declarations = declarations

    def __reduce__(self) -> tuple:
        return (CShims, (self.declarations,))


def c_shims() -> CShims:
    """The ops' C shims for inductor (after `load`)."""
    return CShims(C_SHIMS)


STALE_LOCK_S = 600.0  # a build takes about a minute here: a lock this old was left by a killed one


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove `directory`'s build lock when it is older than `max_age_s` (torch's builder waits on a lock forever,
    and a build killed midway leaves one behind). Returns whether it removed one."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _choice_from_env(variable: str, native: str, other: str) -> bool:
    """Whether `variable` (unset or empty: `native`) picks the extension's own code over `other`."""
    choice = os.environ.get(variable, native).strip().lower() or native
    if choice not in (native, other):
        raise ValueError(f"{variable} must be {native} or {other}, got {choice!r}")
    return choice == native


def use_native_attention(enabled: bool) -> None:
    """Whether fp32 and bf16 sequences with at most `reference.BATCHED_MAX_QUERIES` queries run the extension's own
    attention (the default; `LEAPSERVE_CPU_ATTENTION=sdpa` turns it off at load) or SDPA, as the reference does."""
    assert _module is not None, "cpu_ops.load first"
    _module.set_native_attention(enabled)


def use_native_gemv(enabled: bool) -> None:
    """Whether up to `own_rows` rows run the extension's own GEMM, its loop, AMX tiles or k-major GEMM (the default;
    `LEAPSERVE_CPU_GEMV=onednn` turns it off at load), or oneDNN's packed GEMM, as more rows do (ATen's linear for a
    k-major weight, which has no oneDNN copy)."""
    assert _module is not None, "cpu_ops.load first"
    _module.set_native_gemv(enabled)


def few_rows(dtype: torch.dtype = torch.float32) -> int:
    """The most rows of `dtype` the extension's own linear loop takes: with AVX-512 12 fp32 or 4 bf16 rows, else 3 of
    either; 0 of other dtypes."""
    assert _module is not None, "cpu_ops.load first"
    if dtype not in (torch.float32, torch.bfloat16):
        return 0
    return int(_module.few_rows(dtype == torch.bfloat16))


def own_rows(dtype: torch.dtype, in_features: int, out_features: int) -> int:
    """The most rows of `dtype` the op computes itself (not through oneDNN) for a `[out_features, in_features]`
    weight: every count (2**63 - 1) where the weight is k-major (`k_major`: `out_features` divisible by 16, for bf16
    `in_features` by 2); 16 bf16 rows where the CPU has AMX and the shape suits its tiles; else `few_rows(dtype)`
    where `in_features` is divisible by 16, else 0. Each row's output then has the same bits whatever the row
    count."""
    assert _module is not None, "cpu_ops.load first"
    if dtype not in (torch.float32, torch.bfloat16):
        return 0
    return int(_module.own_rows(dtype == torch.bfloat16, in_features, out_features))


def _cpu_features() -> bytes:
    """The CPU's feature flags (Linux), so that a cache shared between machines builds for each CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().encode()
    return next((line for line in info.splitlines() if line.startswith("flags")), platform.machine()).encode()


@functools.cache
def k_major() -> bool:
    """Whether the op computes fp32 and bf16 GEMMs itself at every row count on this CPU (`k_major_linear` in
    cpu_ops.cpp, over a k-major copy of the weight): it has AVX-512's bf16 dot product and not AMX, as the
    extension's build for it (`-march=native`) sees."""
    flags = set(_cpu_features().split())
    return b"avx512_bf16" in flags and b"amx_bf16" not in flags


def register_packed(key: int, packed: torch.Tensor, is_k_major: bool = False) -> None:
    """`packed` is the oneDNN-packed copy of the plain weight at address `key`, or its k-major copy
    (`packed_linear.k_major_copy`): the op finds it there (now, or once the extension loads)."""
    _packed[key] = (packed, is_k_major)
    if _module is not None:
        _module.register_packed(key, packed, is_k_major)


def release_packed(key: int) -> None:
    """The weight at `key` has no user left: forget its copy (a later weight at that address must not find it)."""
    del _packed[key]
    if _module is not None:
        _module.release_packed(key)


def packed_copy(key: int) -> tuple[torch.Tensor, bool] | None:
    """The packed copy registered for the plain weight at address `key`, and whether it is k-major; None if none."""
    return _packed.get(key)


def loaded() -> ModuleType | None:
    """The extension if `load` has run in this process, else None."""
    return _module


def push_step(
    k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], step: AttentionStep, ops: ModuleType | None = None
) -> bool:
    """Make `step` over these per-layer caches the one `leapserve_cpu::paged_attention` runs (until `pop_step`);
    False, pushing nothing, when the extension is not loaded or the step does not run on the CPU reference.
    `ops`: another build of the extension to push it to (benchmarks/cpu_attention.py's `--against`)."""
    module = ops or _module
    if module is None or step.plan is None:
        return False
    plan = step.plan
    # The padded call's plan only where the op may run it: not where its own attention takes every short sequence.
    cache = k_caches[0]
    native = module.native_attention() and cache.dtype in NATIVE_ATTENTION_DTYPES and cache.shape[-1] % 8 == 0
    batched = None if native else plan.batched
    seqs = plan.seqs
    ranges = [(s.keys.start, s.keys.stop - s.keys.start) if isinstance(s.keys, slice) else (-1, -1) for s in seqs]
    module.push_step(
        k_caches,
        v_caches,
        step.slot_mapping,
        None if batched is None else batched.slots,
        None if batched is None else batched.mask,
        None if batched is None else batched.rows,
        1 if batched is None else batched.max_q,
        [s.start for s in seqs],
        [s.end for s in seqs],
        [r[0] for r in ranges],
        [r[1] for r in ranges],
        [None if isinstance(s.keys, slice) else s.keys for s in seqs],
        [s.mask for s in seqs],
        [s.causal for s in seqs],
    )
    return True


def pop_step(ops: ModuleType | None = None) -> None:
    module = ops or _module
    assert module is not None
    module.pop_step()


def _packed_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)
