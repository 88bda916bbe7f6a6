"""What one target forward costs by the number of tokens it carries, on the engine as `leapserve serve` builds it.

    python -m leapserve.benchmarks.forward_cost --device cuda --json forward.json
    python -m leapserve.benchmarks.forward_cost --enforce-eager --tokens 1,8,64
    python -m leapserve.benchmarks.forward_cost --tokens 1,8,9,12 --repeats 12 --against-onednn

Each point is `ModelRunner.time_forward`: one sequence of T tokens with logits at every row (the shape of verifying
T draft tokens), the fastest of `--repeats`. Where the curve is flat, verifying a tree costs about one plain step
(a GPU, an AMX CPU); where it grows from the first token, trees must be small (an AVX2 CPU). Adaptive speculation
measures the same curve at start-up (`tree_budget.VerifyCost`); this prints it.

`--against-onednn` (a compiled model on CPU) times every count twice per repeat, through the C++ op's own GEMM for
few rows (its loop, or AMX tiles for bf16) and through oneDNN's packed GEMM (`cpu_ops.use_native_gemv`), in
alternating order, and prints both medians and the median of the paired ratios: the comparison behind
`cpu_ops.own_rows`, made in one process so that a shared machine's drift falls on both sides alike. Where weights
are k-major (`cpu_ops.k_major`) they have no oneDNN copy, and the other side is ATen's linear over the plain weight.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from leapserve.decoding.config import DEFAULT_MODEL, DEVICES, DTYPES, EngineConfig, ModelConfig
from leapserve.decoding.engine import LLMEngine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="as `leapserve serve --model`")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--enforce-eager", action="store_true", help="the eager model (default: compiled)")
    parser.add_argument("--tokens", default="1,2,4,8,16,24,32,64,128,256,512", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the points here")
    parser.add_argument(
        "--against-onednn",
        action="store_true",
        help="CPU, compiled: time each count through the own GEMM loop and through oneDNN, alternating, one forward "
        "each per repeat (median of --repeats; give 12 or more)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    counts = [int(t) for t in args.tokens.split(",")]
    model = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, enforce_eager=args.enforce_eager)
    engine = LLMEngine(EngineConfig(model=model, decoder="autoregressive"))
    if args.against_onednn:
        against_onednn(engine, counts, args.repeats)
        return
    ms = {t: 1e3 * engine.runner.time_forward(t, repeats=args.repeats) for t in counts}
    path = "eager" if args.enforce_eager else "compiled"
    print(f"{engine.runner.device}, {path}: " + ", ".join(f"{t}: {v:.2f} ms" for t, v in ms.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": str(engine.runner.device), "path": path, "ms": ms}, indent=1))


def against_onednn(engine: LLMEngine, counts: list[int], repeats: int) -> None:
    """Each count's forward through the own loop and through oneDNN, alternating which goes first, `repeats` times."""
    from leapserve.kernels import cpu_ops

    runner = engine.runner
    if runner.device.type != "cpu" or runner.llama is None or not runner.compile:
        raise SystemExit("--against-onednn compares the compiled CPU model's GEMMs: drop --enforce-eager, use a CPU")
    ms: dict[tuple[int, bool], list[float]] = {(t, own): [] for t in counts for own in (True, False)}
    try:
        for r in range(repeats):
            for t in counts:
                for own in (True, False) if r % 2 == 0 else (False, True):
                    cpu_ops.use_native_gemv(own)
                    ms[t, own].append(1e3 * runner.time_forward(t, repeats=1))
    finally:
        cpu_ops.use_native_gemv(True)
    config = runner.model.config
    rows = cpu_ops.own_rows(runner.cache.k[0].dtype, config.hidden_size, config.intermediate_size)
    print(f"{runner.device}, compiled, own GEMM up to {rows} rows, median of {repeats} forwards each:")
    for t in counts:
        own, onednn = ms[t, True], ms[t, False]
        ratio = statistics.median(a / b for a, b in zip(own, onednn))
        print(
            f"  {t} tokens: own GEMM {statistics.median(own):.2f} ms, oneDNN {statistics.median(onednn):.2f} ms, "
            f"own / oneDNN {ratio:.3f} (paired median)"
        )


if __name__ == "__main__":
    main()
