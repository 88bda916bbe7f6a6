"""The `leapserve` command line: `leapserve serve ...` (flags mirror `vllm serve`)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Sequence

from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from leapserve.decoding.sampling_params import LogitsProcessor

from .api_server import run_server

API_KEY_ENV = "LEAPSERVE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _json_object(text: str) -> dict:
    """argparse type for --speculative-config: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"method\": \"ngram\"}}', got {text!r}")
    return value


def load_logits_processors(spec: str) -> list[LogitsProcessor]:
    """Import `module:callable[,module:callable...]` (argparse type for --logits-processors)."""
    processors = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, sep, attr = item.partition(":")
        if not sep or not module_name or not attr:
            raise argparse.ArgumentTypeError(f"expected module:callable, got {item!r}")
        try:
            processor = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise argparse.ArgumentTypeError(f"cannot load {item!r}: {e}") from e
        if not callable(processor):
            raise argparse.ArgumentTypeError(f"{item!r} is not callable")
        processors.append(processor)
    return processors


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    model, cache, sched, engine = ModelConfig(), CacheConfig(), SchedulerConfig(), EngineConfig()
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=model.model, help="alias, local checkpoint directory, .gguf file or hub id")
    g.add_argument("--dtype", default=model.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=model.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=model.max_model_len,
                   help="context length (prompt + completion); default: the model's")
    g.add_argument("--trust-remote-code", action="store_true", default=model.trust_remote_code)
    g.add_argument("--served-model-name", default=model.served_model_name,
                   help="the name clients send as `model`; default: --model")
    g = p.add_argument_group("KV cache")
    g.add_argument("--block-size", type=int, default=cache.block_size)
    g.add_argument("--kv-cache-tokens", type=int, default=cache.kv_cache_tokens,
                   help="KV cache capacity in tokens; default: a memory fraction on GPU, 32k tokens on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=cache.gpu_memory_utilization)
    g = p.add_argument_group("scheduler")
    g.add_argument("--max-num-seqs", type=int, default=sched.max_num_seqs, help="sequences decoded per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=sched.max_num_batched_tokens,
                   help="prompt tokens processed per step")
    g.add_argument("--max-waiting-requests", type=int, default=sched.max_waiting_requests,
                   help="beyond this many waiting requests, new ones get HTTP 503")
    g = p.add_argument_group("decoding")
    g.add_argument("--decoder", default=engine.decoder,
                   help="autoregressive | speculative | dparallel | silent-thought")
    g.add_argument("--speculative-config", type=_json_object, default=engine.speculative_config,
                   help="JSON object, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'")
    g.add_argument("--seed", type=int, default=engine.seed)
    g.add_argument("--logits-processors", type=load_logits_processors, default=[],
                   help="module:callable[,module:callable]: logits processors added to every request")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help=f"require `Authorization: Bearer <key>` on /v1/*; default: ${API_KEY_ENV}")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.set_defaults(handler=_serve)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    # The one place `server` reaches into `benchmarks`: the CLI is the entry point of both.
    from leapserve.benchmarks import bench_offline, bench_serve

    p = subparsers.add_parser("bench", help="benchmark a server (serve) or the in-process engine (offline)")
    commands = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    for name, module, help_text in (("serve", bench_serve, "latency and throughput of an OpenAI-compatible server"),
                                    ("offline", bench_offline, "decoders on the in-process engine, same prompts")):
        module.add_arguments(commands.add_parser(name, help=help_text, description=module.__doc__,
                                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from leapserve.training import adaspec, data, export, fspad

    p = subparsers.add_parser("train", help="make training data from the target and train drafters for it")
    commands = p.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    for module in (data, fspad, adaspec, export):
        module.add_parser(commands)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          trust_remote_code=args.trust_remote_code, served_model_name=args.served_model_name),
        cache=CacheConfig(block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_waiting_requests=args.max_waiting_requests),
        decoder=args.decoder, speculative_config=args.speculative_config, seed=args.seed,
    )


def _serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_server(engine_config_from_args(args), args.host, args.port, args.api_key or os.environ.get(API_KEY_ENV),
                   logits_processors=args.logits_processors, log_level=args.log_level)
    except (ValueError, OSError) as e:  # bad configuration or model: no traceback
        sys.exit(f"leapserve serve: error: {e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapserve", description="Fast, lossless LLM inference server.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, OSError) as e:  # bad flags, paths or data: a message, not a traceback
        sys.exit(f"leapserve {args.command}: error: {e}")


if __name__ == "__main__":
    sys.exit(main())
