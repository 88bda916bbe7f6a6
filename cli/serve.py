"""`leapserve serve`: the engine's options, generated from its config dataclasses (named as `vllm serve` names
them), and the HTTP server's own."""

from __future__ import annotations

import argparse
import importlib
import logging
import os

from leapserve.decoding.args import DefaultsHelpFormatter, add_config_arguments, config_from_args
from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from leapserve.decoding.decoders import DECODERS
from leapserve.decoding.sampling_params import LogitsProcessor
from leapserve.server import DEFAULT_MAX_REQUEST_BYTES
from leapserve.server.vllm_backend import Parallelism, find_vllm, run_vllm, vllm_command

API_KEY_ENV = "LEAPSERVE_API_KEY"
BACKENDS = ("native", "vllm")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`: one option group per engine config, then the logits processors and the server's."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=DefaultsHelpFormatter,
    )
    for title, cls in (("model", ModelConfig), ("KV cache", CacheConfig), ("scheduler", SchedulerConfig)):
        add_config_arguments(p.add_argument_group(title), cls)
    g = p.add_argument_group("decoding")
    add_config_arguments(g, EngineConfig, overrides={"decoder": {"choices": list(DECODERS)}})
    g.add_argument(
        "--logits-processors",
        type=load_logits_processors,
        default=[],
        help="module:callable[,module:callable]: logits processors added to every request",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", help=f"require `Authorization: Bearer <key>` on /v1/*; default: ${API_KEY_ENV}")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="of leapserve and uvicorn")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="request bodies over this size get a 413 (native backend)",
    )
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="native",
        help="native: leapserve's engine; vllm: vLLM's engine with leapserve's drafters, in a child process",
    )
    g.add_argument(
        "--vllm-executable",
        help="vLLM backend: the `vllm` to run; default: $LEAPSERVE_VLLM, PATH, ./.venv-vllm, the checkout's .venv-vllm",
    )
    add_config_arguments(g, Parallelism)
    p.set_defaults(handler=serve)


def run_server_arguments(args: argparse.Namespace) -> tuple[tuple, dict]:
    """What `serve` hands `run_server`: the engine config from the options, the address, the API key (the flag,
    else $LEAPSERVE_API_KEY), the logits processors, the log level and the body size limit."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    return (config_from_args(EngineConfig, args), args.host, args.port, api_key), {
        "logits_processors": args.logits_processors,
        "log_level": args.log_level,
        "max_request_bytes": args.max_request_bytes,
    }


def serve(args: argparse.Namespace) -> None:
    """The `leapserve serve` handler: the server until it is stopped."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    positional, keywords = run_server_arguments(args)
    parallelism = config_from_args(Parallelism, args)
    if args.backend == "vllm":
        if args.logits_processors:
            raise ValueError("--logits-processors are leapserve's own: they run with --backend native only")
        if args.max_request_bytes != DEFAULT_MAX_REQUEST_BYTES:
            raise ValueError("--max-request-bytes is the native server's: it runs with --backend native only")
        config, host, port, api_key = positional
        executable = find_vllm(args.vllm_executable)
        run_vllm(vllm_command(config, host, port, api_key, args.log_level, parallelism, executable))
        return
    if parallelism.distributed or parallelism.distributed_executor_backend:
        raise ValueError("tensor and pipeline parallelism run on vLLM: add --backend vllm")
    from leapserve.server.app import run_server  # the HTTP stack loads only to serve

    run_server(*positional, **keywords)
