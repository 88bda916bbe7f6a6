"""`leapserve bench serve`: latency and throughput of any OpenAI-compatible server (leapserve, vLLM, others) under
fixed concurrency levels, measured the way vLLM's `bench serve` measures them (see `bench_metrics`).

Every level sends the same prompts as streaming requests with at most `concurrency` of them in flight, and scrapes
`/metrics` before and after: where the server exposes the spec-decode counters (`leapserve:` or `vllm:`
`spec_decode_num_drafts_total`, `..._num_draft_tokens_total`, `..._num_accepted_tokens_total`), the level also
reports the acceptance rate and the mean acceptance length.

`--against URL[,URL...]` measures other servers in the same run, in turn with the first: each level `--rounds` times
per server, the order reversing round by round (A B C, C B A, A B C, ...), so that a machine drifting over the run
(another hour, another load) weighs on all alike. A pair's ratio is the first server's output tok/s over another's;
the median over the rounds is the figure to read, their spread how far to trust it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from leapserve.prompts import load as load_prompts

from .bench_metrics import SPEC_COUNTERS, StreamedRequest, serve_summary, spec_decode_stats
from .report import (
    add_output_arguments,
    fmt,
    markdown_table,
    plot_paired_serve,
    plot_serve,
    positive_int_list,
    run_record,
    write_outputs,
)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
Prompt = str | list[dict]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, with or without a trailing /v1")
    p.add_argument(
        "--endpoint",
        default=ENDPOINTS[0],
        choices=ENDPOINTS,
        help="chat: prompts go through the server's chat template",
    )
    p.add_argument("--model", help="the model name to send; None: the first one the server lists")
    p.add_argument("--api-key", help="Bearer key; default: $OPENAI_API_KEY, then $LEAPSERVE_API_KEY")
    p.add_argument(
        "--dataset",
        default="mixed",
        help="chat | code | summarization | math | mixed (the 'test' split), handwritten, or a .jsonl file with "
        "'prompt' or 'messages' per line",
    )
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    p.add_argument(
        "--concurrency",
        type=positive_int_list,
        default="1,4,16",
        help="comma-separated levels: requests in flight at once",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0, help="sent when below 1")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (leapserve, vLLM): fixed-length outputs")
    p.add_argument("--seed", type=int, default=0, help="the prompt order")
    p.add_argument("--num-warmups", type=int, default=1, help="requests sent before the first level, not counted")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    g = p.add_argument_group("paired with other servers")
    g.add_argument(
        "--against",
        metavar="URL[,URL...]",
        help="other servers measured in the same run, in turn with --base-url at every level; reports "
        "--base-url's output tok/s over each one's per round and their median",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --against: each level this many times per server, the servers' order reversing round by round",
    )
    add_output_arguments(p)
    p.set_defaults(handler=run)


def request_body(prompt: Prompt, args: argparse.Namespace, model: str | None = None) -> dict:
    body = {
        "model": model or args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.top_p < 1.0:
        body["top_p"] = args.top_p
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "/v1/completions":
        return {**body, "prompt": prompt}
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return {**body, "messages": messages}


def _chunk_text(event: dict) -> str:
    """The output text one streamed chunk carries (chat delta or completion text)."""
    for choice in event.get("choices") or []:
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text:
            return text
    return ""


async def send(client: httpx.AsyncClient, url: str, body: dict) -> StreamedRequest:
    """One streaming request, timed from sending to the end of the stream."""
    start = time.perf_counter()
    req = StreamedRequest(start=start, end=start)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                req.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[5:])
                    if "error" in event:
                        req.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    elif _chunk_text(event):
                        req.token_times.append(now)
                    if event.get("usage"):
                        req.output_tokens = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        req.error = f"{type(e).__name__}: {e}"
    req.end = time.perf_counter()
    return req


def spec_counters(metrics_text: str) -> dict[str, float]:
    """The spec-decode counters of a Prometheus page, by name without the server's prefix, summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = sample.name.rsplit(":", 1)[-1]
            if name in SPEC_COUNTERS:
                totals[name] = totals.get(name, 0.0) + sample.value
    return totals


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """The server's spec-decode counters now; empty when it has no /metrics or no such counters."""
    try:
        resp = await client.get(f"{base_url}/metrics")
    except httpx.HTTPError:
        return {}
    return spec_counters(resp.text) if resp.status_code == 200 else {}


async def run_level(
    client: httpx.AsyncClient, url: str, bodies: list[dict], concurrency: int, label: str = ""
) -> tuple[list[StreamedRequest], float]:
    """All `bodies` with at most `concurrency` in flight; the requests and the level's wall time."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(bodies), desc=f"{label}concurrency {concurrency}", unit="req")

    async def one(body: dict) -> StreamedRequest:
        async with gate:
            result = await send(client, url, body)
        bar.update(1)
        return result

    start = time.perf_counter()
    requests = await asyncio.gather(*(one(b) for b in bodies))
    duration = time.perf_counter() - start
    bar.close()
    return list(requests), duration


class ServerError(Exception):
    """A server cannot be asked for its models, or its warm-up request failed: nothing is measured."""


@dataclass
class Server:
    name: str  # "base" (--base-url), "against" (one --against URL) or "against N" (the N-th of several)
    base_url: str  # without /v1
    model: str = ""


async def _first_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(f"{base_url}/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        raise ServerError(f"cannot list the models of {base_url}: {type(e).__name__}: {e}") from e


async def measure_level(
    client: httpx.AsyncClient,
    server: Server,
    args: argparse.Namespace,
    prompts: list[Prompt],
    concurrency: int,
    label: str = "",
) -> dict:
    """One level on one server: its summary, spec-decode stats from the scrapes around it, and the first errors."""
    bodies = [request_body(p, args, server.model) for p in prompts]
    before = await scrape(client, server.base_url)
    requests, duration = await run_level(client, server.base_url + args.endpoint, bodies, concurrency, label)
    after = await scrape(client, server.base_url)
    errors = list(dict.fromkeys(r.error for r in requests if r.error))
    return {
        "concurrency": concurrency,
        **serve_summary(requests, duration),
        "spec_decode": spec_decode_stats(before, after),
        "errors": errors[:5],
    }


async def bench(args: argparse.Namespace, prompts: list[Prompt]) -> list[dict]:
    """Warm up each server, then every concurrency level `rounds` times on each, the servers taking turns to go
    first; one result dict per (level, round, server), in the order they ran."""
    servers = [Server("base", _root(args.base_url))]
    against = against_urls(args)
    servers += [Server("against" if len(against) == 1 else f"against {i}", url) for i, url in enumerate(against, 1)]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("LEAPSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 1, max_keepalive_connections=max(args.concurrency))
    async with httpx.AsyncClient(headers=headers, timeout=args.request_timeout, limits=limits) as client:
        for server in servers:
            server.model = args.model or await _first_model(client, server.base_url)
            for prompt in prompts[: args.num_warmups]:
                warmup = await send(client, server.base_url + args.endpoint, request_body(prompt, args, server.model))
                if warmup.error:
                    raise ServerError(f"the warm-up request to {server.base_url} failed: {warmup.error}")
        levels = []
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for server in servers if round_ % 2 == 0 else servers[::-1]:
                    label = f"{server.name}, round {round_ + 1}, " if len(servers) > 1 else ""
                    level = await measure_level(client, server, args, prompts, concurrency, label)
                    levels.append(
                        {"server": server.name, "url": server.base_url, "model": server.model, "round": round_, **level}
                    )
    if args.model is None:
        args.model = servers[0].model
    return levels


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def against_urls(args: argparse.Namespace) -> list[str]:
    """The --against servers' URLs (without /v1), in order."""
    return [_root(url.strip()) for url in (args.against or "").split(",") if url.strip()]


def paired(levels: list[dict]) -> list[dict]:
    """Per concurrency and other server: both servers' output tok/s per round, base / that server per round, and
    the median ratio."""
    out = []
    others = [name for name in dict.fromkeys(lv["server"] for lv in levels) if name != "base"]
    for concurrency in dict.fromkeys(lv["concurrency"] for lv in levels):
        runs = {
            name: [
                lv["output_throughput"] for lv in levels if lv["concurrency"] == concurrency and lv["server"] == name
            ]
            for name in ("base", *others)
        }
        for name in others:
            ratios = [b / a if a else None for b, a in zip(runs["base"], runs[name], strict=True)]
            known = [r for r in ratios if r is not None]
            out.append(
                {
                    "concurrency": concurrency,
                    "against": name,
                    "against_url": next(lv["url"] for lv in levels if lv["server"] == name),
                    "base_tokens_per_s": runs["base"],
                    "against_tokens_per_s": runs[name],
                    "ratios": ratios,
                    "median_ratio": statistics.median(known) if known else None,
                }
            )
    return out


def table(levels: list[dict]) -> str:
    """A row per level run; with several servers or rounds, which one and which round lead the row."""

    def dist(d: dict) -> str:
        return " / ".join(fmt(d[k], 1) for k in ("mean", "median", "p99"))

    several = len({(lv["server"], lv["round"]) for lv in levels}) > 1
    headers = [
        "concurrency",
        "completed",
        "failed",
        "req/s",
        "output tok/s",
        "TTFT ms (mean / median / p99)",
        "TPOT ms",
        "ITL ms",
        "E2E ms",
        "acceptance rate",
        "mean acceptance length",
    ]
    rows = [
        [
            lv["concurrency"],
            lv["completed"],
            lv["failed"],
            lv["request_throughput"],
            lv["output_throughput"],
            dist(lv["ttft_ms"]),
            dist(lv["tpot_ms"]),
            dist(lv["itl_ms"]),
            dist(lv["e2e_ms"]),
            (lv["spec_decode"] or {}).get("acceptance_rate"),
            (lv["spec_decode"] or {}).get("mean_acceptance_length"),
        ]
        for lv in levels
    ]
    if several:
        headers = ["server", "round", *headers]
        rows = [[lv["server"], lv["round"] + 1, *row] for lv, row in zip(levels, rows)]
    return markdown_table(headers, rows)


def paired_table(pairs: list[dict]) -> str:
    def each(values: list) -> str:
        return ", ".join(fmt(v) for v in values)

    several = len({p["against"] for p in pairs}) > 1
    headers = ["concurrency", "base tok/s", "against tok/s", "base / against", "median base / against"]
    rows = [
        [
            p["concurrency"],
            *([f"{p['against']}: {p['against_url']}"] if several else []),
            each(p["base_tokens_per_s"]),
            each(p["against_tokens_per_s"]),
            each(p["ratios"]),
            p["median_ratio"],
        ]
        for p in pairs
    ]
    if several:
        headers.insert(1, "against")
    return markdown_table(headers, rows)


def run(args: argparse.Namespace) -> None:
    """The `leapserve bench serve` handler."""
    if args.rounds < 1 or (args.rounds > 1 and not against_urls(args)):
        sys.exit(f"leapserve bench serve: error: --rounds {args.rounds}: a positive count, above 1 only with --against")
    try:
        prompts = load_prompts(args.dataset, "test", args.num_prompts, args.seed)
    except (OSError, ValueError) as e:
        sys.exit(f"leapserve bench serve: error: {e}")
    if args.endpoint == "/v1/completions" and any(isinstance(p, list) for p in prompts):
        sys.exit("leapserve bench serve: error: the dataset has chat 'messages'; use --endpoint /v1/chat/completions")
    try:
        levels = asyncio.run(bench(args, prompts))
    except ServerError as e:
        sys.exit(f"leapserve bench serve: error: {e}")
    pairs = paired(levels) if against_urls(args) else None
    text = table(levels) if pairs is None else f"{table(levels)}\n\n{paired_table(pairs)}"
    extra = {"paired": pairs} if pairs is not None else {}
    record = run_record("serve", args, levels, num_prompts=len(prompts), **extra)
    write_outputs(record, text, args.output_json, args.output_md)
    if args.output_json is not None:
        plot = Path(args.output_json).with_suffix(".png")
        title = f"{args.model} @ {args.base_url}, {len(prompts)} prompts from {args.dataset}"
        if pairs is None:
            plot_serve(levels, plot, title)
        else:
            urls = against_urls(args)
            plot_paired_serve(pairs, plot, f"{title}, against {urls[0] if len(urls) == 1 else f'{len(urls)} servers'}")
        print(f"wrote {plot}")
