"""The `leapserve` command: `serve`, `bench serve|offline` and
`train data|fspad|adaspec|export-eagle|mdm|dparallel|sft|dart`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leapserve.benchmarks import bench_offline, bench_serve
from leapserve.decoding.args import DefaultsHelpFormatter
from leapserve.training import adaspec, dart, data, dparallel, export, fspad, mdm, sft

from . import serve


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark a server (serve) or the in-process engine (offline)")
    commands = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    for name, module, help_text in (
        ("serve", bench_serve, "latency and throughput of an OpenAI-compatible server"),
        ("offline", bench_offline, "decoders on the in-process engine, same prompts"),
    ):
        module.add_arguments(
            commands.add_parser(name, help=help_text, description=module.__doc__, formatter_class=DefaultsHelpFormatter)
        )


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="make training data from the target and train drafters for it")
    commands = p.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    for module in (data, fspad, adaspec, export, mdm, dparallel, sft, dart):
        module.add_parser(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapserve", description="Fast, lossless LLM inference server.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (default: the process's) and run the command's handler."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, OSError) as e:  # bad flags, paths, data or models: a message, not a traceback
        sys.exit(f"leapserve {args.command}: error: {e}")
