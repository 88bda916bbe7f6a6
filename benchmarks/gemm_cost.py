"""The GEMMs of one forward of a model's shape, over random weights, through the C++ op's own GEMM and through
oneDNN's packed GEMM, by row count (CPU).

    python -m leapserve.benchmarks.gemm_cost --dtype bfloat16 --rows 1,4,9,16,35,128,512
    python -m leapserve.benchmarks.gemm_cost --dtype float32 --rows 1,12,16 --rounds 3 --json gemms.json

The GEMMs are those of leapserve's Llama for `--model`'s shape: per layer the fused q/k/v, o, the fused gate/up and
down projections, then the LM head (121 for SmolLM2-135M). Each side has its own random weights, larger together
than the caches, so each pass reads them from memory as a decode step does: the op's packed as a compiled model's
are (`PackedLinear`: k-major where `cpu_ops.k_major`, else oneDNN's copy with the op's loop or AMX's tiles taking
`cpu_ops.own_rows`), and oneDNN's copies called through the op with its own GEMM turned off. A pass is every GEMM
once on a fresh input of that many rows; per round and row count the median of `--repeats` passes of each side,
taken in turn (the order alternating by round); printed per round with the ratio own / oneDNN. This is the
benchmark behind docs/compile.md's GEMM tables; `forward_cost --against-onednn` times whole forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from leapserve.decoding.config import DEFAULT_MODEL
from leapserve.decoding.model_loader import cache_dir, resolve_model
from leapserve.kernels import cpu_ops
from leapserve.kernels.packed_linear import PACK_BATCH_HINT, PackedLinear, packable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="whose shapes (its config only; weights are random)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,4,9,12,16,35,64,128", help="comma-separated row counts")
    parser.add_argument("--repeats", type=int, default=5, help="passes per side, round and row count (the median)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the times here")
    return parser


def gemm_shapes(model: str) -> list[tuple[int, int]]:
    """[out, in] of every GEMM of a forward of leapserve's Llama for `model`'s config, in order."""
    c = AutoConfig.from_pretrained(resolve_model(model))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    layer = [(qkv, c.hidden_size), (c.hidden_size, c.num_attention_heads * head_dim)]
    layer += [(2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    return layer * c.num_hidden_layers + [(c.vocab_size, c.hidden_size)]


def onednn_weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A random weight registered with oneDNN's packed copy, whatever the op would pack it as."""
    weight = torch.randn(shape).mul_(0.05).to(dtype)
    cpu_ops.register_packed(weight.data_ptr(), torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT))
    return weight


def time_pass(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Median seconds of `repeats` passes over every weight, each on its own fresh input."""
    xs = [torch.randn(rows, w.shape[1]).to(w.dtype) for w in weights]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w, x in zip(weights, xs):
            torch.ops.leapserve_cpu.packed_linear(x, w, None)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not packable(torch.zeros(2, 2, dtype=dtype)):
        raise SystemExit(f"oneDNN does not pack {args.dtype} weights on this CPU")
    cpu_ops.load(cache_dir() / "extensions")
    shapes, counts = gemm_shapes(args.model), [int(r) for r in args.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    own = [PackedLinear(torch.randn(shape, generator=gen).mul_(0.05).to(dtype)) for shape in shapes]
    onednn = [onednn_weight(shape, dtype) for shape in shapes]
    rows_own = cpu_ops.own_rows(dtype, shapes[0][1], shapes[0][0])
    path = "k-major" if own[0].k_major else f"own loop or tiles up to {rows_own} rows"
    print(f"{len(shapes)} GEMMs of {args.model}'s shape, {args.dtype}, the op's own GEMM ({path}) / oneDNN's packed:")
    results: dict[int, list[dict[str, float]]] = {r: [] for r in counts}
    try:
        for round_ in range(args.rounds):
            for rows in counts:
                ms = {}
                for side in ("own", "onednn") if round_ % 2 == 0 else ("onednn", "own"):
                    cpu_ops.use_native_gemv(side == "own")
                    weights = [lin.weight for lin in own] if side == "own" else onednn
                    ms[side] = 1e3 * time_pass(weights, rows, args.repeats)
                results[rows].append(ms)
                print(
                    f"round {round_ + 1}, {rows} rows: own {ms['own']:.2f} ms, oneDNN {ms['onednn']:.2f} ms, "
                    f"ratio {ms['own'] / ms['onednn']:.2f}",
                    flush=True,
                )
    finally:
        cpu_ops.use_native_gemv(True)
        for w in onednn:
            cpu_ops.release_packed(w.data_ptr())
    if args.json is not None:
        args.json.write_text(json.dumps({"dtype": args.dtype, "path": path, "ms": results}, indent=1))


if __name__ == "__main__":
    main()
