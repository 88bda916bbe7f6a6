"""A checkpoint with a model's config and tokenizer and random weights, for timing where the real weights cannot
go (a lent GPU machine takes tens of MB, SmolLM2-135M is 538 MB): a step's cost does not depend on the values.

    python -m leapserve.benchmarks.random_checkpoint ~/.cache/leapserve/smollm2-135m-instruct /tmp/smollm2-random
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def save_random(source: Path, out: Path, seed: int = 0) -> int:
    """Write `source`'s architecture with weights drawn from `seed` to `out`; the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a checkpoint directory (its config.json and tokenizer are read)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {args.out}: {save_random(args.source, args.out, args.seed):,} random parameters")


if __name__ == "__main__":
    main()
