"""Times the C++ CPU attention op (`leapserve_cpu::paged_attention`) on one sequence: decoding and verifying trees.

    python -m leapserve.benchmarks.cpu_attention
    python -m leapserve.benchmarks.cpu_attention --dtype bfloat16 --contexts 150,600 --new 1,9,13
    git show HEAD~1:kernels/cpu_ops.cpp > /tmp/old.cpp
    python -m leapserve.benchmarks.cpu_attention --against /tmp/old.cpp

Each point is one layer's call for one sequence of `new` query tokens (a causal chain: a tree's rows cost the same)
after `context` cached tokens, in SmolLM2-135M's shape by default (9 query heads over 3 KV heads of 64, pages of 16):
the median over `--repeats` rounds of `--calls` calls, in microseconds a call. A model step makes one call a layer
(30 for SmolLM2). `--against FILE` builds another version of kernels/cpu_ops.cpp beside this one (its op under
another name) and times both in the same process, alternating which goes first in each round, with the median of
the paired ratios: on a shared machine whose speed drifts, separate runs of two builds differ by more than the
change.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from leapserve.decoding.paths import cache_dir
from leapserve.kernels import AttentionStep, cpu_ops

AGAINST = "leapserve_cpu_against"  # the namespace the --against build's ops take


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--contexts", default="150,600", help="comma-separated cached tokens before the new ones")
    parser.add_argument("--new", default="1,9,13", help="comma-separated new tokens (queries) per call")
    parser.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head size")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=101)
    parser.add_argument("--against", type=Path, default=None, help="another cpu_ops.cpp to time beside this one")
    return parser


def build_against(source: Path) -> ModuleType:
    """`source` built as a second extension whose ops live under `AGAINST` (and its C shims under other names)."""
    from torch.utils.cpp_extension import load as build

    if not source.is_file():
        raise SystemExit(f"--against {source}: no such file (e.g. git show REV:kernels/cpu_ops.cpp > FILE)")
    text = source.read_text().replace("leapserve_cpu", AGAINST).replace("aoti_torch_cpu_", "aoti_against_cpu_")
    digest = hashlib.sha256(text.encode() + " ".join(cpu_ops.CFLAGS).encode()).hexdigest()[:12]
    directory = cache_dir() / "extensions" / f"against_{digest}"  # built once per source, like the op itself
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / "cpu_ops_against.cpp"
    if not copy.is_file() or copy.read_text() != text:  # rewritten, it would be rebuilt (its time is newer)
        copy.write_text(text)
    return build(
        f"against_{digest}",
        [str(copy)],
        extra_cflags=cpu_ops.CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )


def time_calls(
    ops: dict[str, tuple[Callable, ModuleType | None]],
    context: int,
    new: int,
    dtype: torch.dtype,
    heads: tuple[int, int, int],
    calls: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Microseconds a call of each op, one figure per round, the ops' order alternating between rounds."""
    q_heads, kv_heads, dim = heads
    gen = torch.Generator().manual_seed(0)
    blocks = (context + new + 15) // 16
    k_cache = torch.randn(blocks, 16, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, 16, kv_heads, dim, generator=gen).to(dtype)
    slots = torch.arange(context, context + new)
    step = AttentionStep(
        slots,
        torch.arange(blocks, dtype=torch.int32).view(1, blocks),
        torch.tensor([context], dtype=torch.int32),
        torch.tensor([0, new], dtype=torch.int32),
        torch.ones(new, new, dtype=torch.bool).tril() if new > 1 else None,
        16,
    )
    q = torch.randn(new, q_heads, dim, generator=gen).to(dtype)
    k, v = k_cache.view(-1, kv_heads, dim)[slots].clone(), v_cache.view(-1, kv_heads, dim)[slots].clone()
    for _, module in ops.values():
        if not cpu_ops.push_step([k_cache], [v_cache], step, module):
            raise SystemExit("the C++ CPU ops did not take the step")
    times: dict[str, list[float]] = {name: [] for name in ops}
    try:
        for op, _ in ops.values():  # warm-up
            for _ in range(calls // 5 + 1):
                op(q, k, v, 0, dim**-0.5)
        for r in range(repeats):
            for name in list(ops) if r % 2 == 0 else list(ops)[::-1]:
                op = ops[name][0]
                start = time.perf_counter()
                for _ in range(calls):
                    op(q, k, v, 0, dim**-0.5)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    finally:
        for _, module in ops.values():
            cpu_ops.pop_step(module)
    return times


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        q_heads, kv_heads, dim = (int(h) for h in args.heads.split(","))
    except ValueError:
        raise SystemExit("--heads: three integers (query heads, KV heads, head size)") from None
    if q_heads % kv_heads or dim % 8:
        raise SystemExit("--heads: the KV heads must divide the query heads, and the head size be a multiple of 8")
    cpu_ops.load(cache_dir() / "extensions")
    ops: dict[str, tuple[Callable, ModuleType | None]] = {"this": (torch.ops.leapserve_cpu.paged_attention, None)}
    if args.against is not None:
        module = build_against(args.against)
        ops["against"] = (getattr(torch.ops, AGAINST).paged_attention, module)
    dtype = getattr(torch, args.dtype)
    print(
        f"{args.dtype}, {torch.get_num_threads()} threads, heads {(q_heads, kv_heads, dim)}: microseconds a call, "
        f"median of {args.repeats} rounds"
    )
    names = list(ops)
    print(f"| context | new | {' | '.join(names)} |" + (" against / this (paired) |" if len(ops) > 1 else ""))
    print("|---|---|" + "---|" * (len(ops) + (len(ops) > 1)))
    for context in (int(c) for c in args.contexts.split(",")):
        for new in (int(n) for n in args.new.split(",")):
            times = time_calls(ops, context, new, dtype, (q_heads, kv_heads, dim), args.calls, args.repeats)
            cells = [f"{statistics.median(times[n]):.1f}" for n in names]
            if len(ops) > 1:
                cells.append(f"{statistics.median(a / t for a, t in zip(times['against'], times['this'])):.2f}")
            print(f"| {context} | {new} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
