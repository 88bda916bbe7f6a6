"""Times `leapserve.kernels.tree_attention` against dense attention baselines, on a GPU.

    python -m leapserve.benchmarks.kernel_bench                 # full grid, bf16, on cuda
    python -m leapserve.benchmarks.kernel_bench --smoke         # tiny CPU run of the reference (a self-check)

Every shape packs `batch` sequences of `new` query tokens over `context` cached tokens (paged, shuffled pages).
Reported per implementation: median time, achieved bandwidth (bytes of the K/V it must read + q + out, over the
time) and that bandwidth as a fraction of the device's measured copy bandwidth (a large device-to-device copy).
Baselines: `sdpa_dense` (torch SDPA over K/V already gathered into dense tensors, with an explicit dense mask; the
gather is not timed), and where importable `flash_attn` (varlen, causal: it cannot take a tree mask) and
`flashinfer` (paged prefill with the same custom mask). `max_diff` is leapserve's max |difference| from sdpa_dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from leapserve.kernels import tree_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Shape:
    batch: int
    new: int
    context: int
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    mask: str  # "tree" (random tree over the new tokens) or "causal"


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    tree_mask: torch.Tensor | None
    visible: torch.Tensor  # bool [batch, new, context + new], the same for every sequence


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    num_keys = shape.context + shape.new
    pages_per_seq = -(-num_keys // shape.page_size)
    num_pages = shape.batch * pages_per_seq
    cache_shape = (num_pages, shape.page_size, shape.kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    block_tables = torch.randperm(num_pages, generator=gen).to(torch.int32).view(shape.batch, pages_per_seq)
    new_visible = torch.ones(shape.new, shape.new, dtype=torch.bool).tril()
    if shape.mask == "tree":
        for i in range(1, shape.new):  # node i hangs under a random earlier node: its ancestors plus itself
            parent = int(torch.randint(0, i, (1,), generator=gen))
            new_visible[i] = new_visible[parent]
            new_visible[i, i] = True
    visible = torch.cat([torch.ones(shape.new, shape.context, dtype=torch.bool), new_visible], dim=1)
    tree_mask = new_visible.repeat(shape.batch, 1).to(device) if shape.mask == "tree" else None
    i32 = dict(dtype=torch.int32, device=device)
    return Inputs(
        q=torch.randn(shape.batch * shape.new, shape.q_heads, shape.head_dim, dtype=shape.dtype, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(device),
        context_lens=torch.full((shape.batch,), shape.context, **i32),
        cu_seqlens_q=torch.arange(0, shape.batch * shape.new + 1, shape.new, **i32),
        tree_mask=tree_mask,
        visible=visible.to(device).expand(shape.batch, -1, -1),
    )


def bytes_moved(shape: Shape) -> int:
    """The minimum traffic: every sequence's K and V once, q read, out written."""
    element = torch.finfo(shape.dtype).bits // 8
    kv = 2 * shape.batch * (shape.context + shape.new) * shape.kv_heads * shape.head_dim
    q_and_out = 2 * shape.batch * shape.new * shape.q_heads * shape.head_dim
    return (kv + q_and_out) * element


def gather_dense(inputs: Inputs, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as dense [batch, kv_heads, context + new, head_dim] tensors (untimed setup for the dense baselines)."""
    num_keys = shape.context + shape.new

    def gather(cache: torch.Tensor) -> torch.Tensor:
        rows = cache[inputs.block_tables.long()].flatten(1, 2)[:, :num_keys]
        return rows.transpose(1, 2).contiguous()

    return gather(inputs.k_cache), gather(inputs.v_cache)


def benchmark_fn(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / benchmark_fn(lambda: dst.copy_(src), device)


def implementations(inputs: Inputs, shape: Shape, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument call; each returns [T, q_heads, head_dim]."""

    def leapserve() -> torch.Tensor:
        return tree_attention(
            inputs.q,
            inputs.k_cache,
            inputs.v_cache,
            inputs.block_tables,
            inputs.context_lens,
            inputs.cu_seqlens_q,
            inputs.tree_mask,
        )

    keys, values = gather_dense(inputs, shape)
    q_dense = inputs.q.view(shape.batch, shape.new, shape.q_heads, shape.head_dim).transpose(1, 2)
    mask = inputs.visible[:, None]

    def sdpa_dense() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q_dense, keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape_as(inputs.q)

    impls = {"leapserve": leapserve, "sdpa_dense": sdpa_dense}
    if device.type == "cuda":
        impls.update(_flash_attn(inputs, shape, keys, values))
        impls.update(_flashinfer(inputs, shape, device))
    return impls


def _flash_attn(inputs: Inputs, shape: Shape, keys: torch.Tensor, values: torch.Tensor) -> dict:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return {}
    num_keys = shape.context + shape.new
    k_packed = keys.transpose(1, 2).reshape(-1, shape.kv_heads, shape.head_dim)
    v_packed = values.transpose(1, 2).reshape(-1, shape.kv_heads, shape.head_dim)
    cu_k = torch.arange(0, shape.batch * num_keys + 1, num_keys, dtype=torch.int32, device=keys.device)

    def flash_attn_causal() -> torch.Tensor:
        return flash_attn_varlen_func(
            inputs.q, k_packed, v_packed, inputs.cu_seqlens_q, cu_k, shape.new, num_keys, causal=True
        )

    return {"flash_attn(causal)": flash_attn_causal}


def _flashinfer(inputs: Inputs, shape: Shape, device: torch.device) -> dict:
    try:
        import flashinfer
    except ImportError:
        return {}
    pages_per_seq = inputs.block_tables.shape[1]
    last_page = (shape.context + shape.new) - (pages_per_seq - 1) * shape.page_size
    i32 = dict(dtype=torch.int32, device=device)
    try:
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(
            inputs.cu_seqlens_q,
            torch.arange(0, inputs.block_tables.numel() + 1, pages_per_seq, **i32),
            inputs.block_tables.flatten(),
            torch.full((shape.batch,), last_page, **i32),
            shape.q_heads,
            shape.kv_heads,
            shape.head_dim,
            shape.page_size,
            causal=shape.mask == "causal",
            custom_mask=inputs.visible.flatten() if shape.mask == "tree" else None,
            q_data_type=shape.dtype,
        )
    except Exception as exc:  # an API mismatch is reported as this baseline's error, like a failed run
        error = exc  # `exc` itself is unbound when the except block ends

        def failed() -> torch.Tensor:
            raise error

        return {"flashinfer": failed}
    return {"flashinfer": lambda: wrapper.run(inputs.q, (inputs.k_cache, inputs.v_cache))}


def run(shapes: list[Shape], device: torch.device) -> tuple[list[dict], float]:
    copy_bw = copy_bandwidth(device)
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape, device)
        impls = implementations(inputs, shape, device)
        reference_out = impls["sdpa_dense"]()
        for name, fn in impls.items():
            row = dict(batch=shape.batch, new=shape.new, context=shape.context, mask=shape.mask, impl=name)
            try:
                seconds = benchmark_fn(fn, device)
            except Exception as exc:  # a baseline that rejects the shape is reported, not fatal
                rows.append(row | dict(error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            bandwidth = bytes_moved(shape) / seconds
            row |= dict(ms=seconds * 1e3, gb_per_s=bandwidth / 1e9, frac_copy_bw=bandwidth / copy_bw)
            if name == "leapserve":
                row["max_diff"] = (fn().float() - reference_out.float()).abs().max().item()
            rows.append(row)
        del inputs, impls, reference_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, copy_bw


def markdown(rows: list[dict], copy_bw: float, device_name: str) -> str:
    lines = [
        f"device: {device_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s",
        "",
        "| batch | new | context | mask | impl | ms | GB/s | of copy BW | max diff |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['batch']} | {r['new']} | {r['context']} | {r['mask']} | {r['impl']} | "
                f"error: {r['error']} | | | |"
            )
            continue
        diff = f"{r['max_diff']:.1e}" if "max_diff" in r else ""
        lines.append(
            f"| {r['batch']} | {r['new']} | {r['context']} | {r['mask']} | {r['impl']} | {r['ms']:.3f} | "
            f"{r['gb_per_s']:.0f} | {100 * r['frac_copy_bw']:.0f}% | {diff} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--new", type=int, nargs="+", default=[1, 8, 64], help="new (query) tokens per sequence")
    parser.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--mask",
        choices=["tree", "causal"],
        default="tree",
        help="mask over the new tokens when new > 1 (a random tree, or causal)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results/kernel_bench.json"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU (the PyTorch reference path), fp32; checks the script runs",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        args.batch, args.new, args.context = [1, 3], [1, 5], [40]
        args.q_heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 64, "fp32"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device; use --smoke for a CPU check")
    else:
        device = torch.device("cuda")
    shapes = [
        Shape(
            b,
            n,
            c,
            args.q_heads,
            args.kv_heads,
            args.head_dim,
            args.page_size,
            DTYPES[args.dtype],
            args.mask if n > 1 else "causal",
        )
        for b in args.batch
        for n in args.new
        for c in args.context
    ]
    rows, copy_bw = run(shapes, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(markdown(rows, copy_bw, device_name))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                device=device_name,
                copy_bytes_per_s=copy_bw,
                dtype=args.dtype,
                q_heads=args.q_heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                page_size=args.page_size,
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    if any(r.get("max_diff", 0.0) > 0.05 for r in rows):
        raise SystemExit("leapserve's output differs from sdpa_dense")


if __name__ == "__main__":
    main()
