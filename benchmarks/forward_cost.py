"""What one target forward costs by the number of tokens it carries, on the engine as `leapserve serve` builds it.

    python -m leapserve.benchmarks.forward_cost --device cuda --json forward.json
    python -m leapserve.benchmarks.forward_cost --enforce-eager --tokens 1,8,64

Each point is `ModelRunner.time_forward`: one sequence of T tokens with logits at every row (the shape of verifying
T draft tokens), the fastest of `--repeats`. Where the curve is flat, verifying a tree costs about one plain step
(a GPU, an AMX CPU); where it grows from the first token, trees must be small (an AVX2 CPU). Adaptive speculation
measures the same curve at start-up (`tree_budget.VerifyCost`); this prints it.
"""

from __future__ import annotations

import argparse
import json
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    counts = [int(t) for t in args.tokens.split(",")]
    model = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, enforce_eager=args.enforce_eager)
    engine = LLMEngine(EngineConfig(model=model, decoder="autoregressive"))
    ms = {t: 1e3 * engine.runner.time_forward(t, repeats=args.repeats) for t in counts}
    path = "eager" if args.enforce_eager else "compiled"
    print(f"{engine.runner.device}, {path}: " + ", ".join(f"{t}: {v:.2f} ms" for t, v in ms.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": str(engine.runner.device), "path": path, "ms": ms}, indent=1))


if __name__ == "__main__":
    main()
