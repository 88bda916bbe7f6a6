"""`leapserve bench offline`: decoders on the in-process engine, on the same prompts in the same run.

For each batch size b, every decoder generates greedily for the whole prompt set in groups of b prompts (or, with
`--continuous`, submitted at once with at most b running: continuous batching, a finished request's place going
to the next prompt, as under a server's steady load); the decoders take turns within each repeat (interleaved, so
that drift on a shared machine hits all alike) and each figure is the median over repeats. Reported per (decoder,
b): output tokens/s, the speedup over `autoregressive`, target forwards per output token, mean acceptance length,
the weight bandwidth the target achieves (weight bytes x target forwards/s: every forward streams all weights
once), and for speculative decoders what their drafting steps cost against their own plain steps in the same pass
(`bench_metrics.drafting_cost`: blind to the drift between passes that moves tok/s by 5-15% on a shared CPU, so
it shows the price of adaptive speculation's probes where the speedup cannot). `--baselines hf` adds
`transformers`' `generate` on the same checkpoint: plain (left-padded batches), with `assistant_model` and with
`prompt_lookup_num_tokens` (both batch size 1 only, as transformers allows). `--roofline` times every pass on a
modeled accelerator instead of the wall clock (`roofline.py`): what adaptive speculation would do on a GPU, here.

A masked diffusion LM runs on `dparallel` decoders only: then the first decoder is the baseline, and target forwards
per token are its denoising steps per output token.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.args import add_config_arguments, config_from_args
from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig
from leapserve.decoding.model_loader import load_tokenizer, resolve_model
from leapserve.prompts import load as load_prompts

from .bench_metrics import Pass, offline_summary, speedup
from .decoder_specs import BASELINE, DIFFUSION, NAMED_CONFIGS, Decoder, decoder_list
from .engine_pass import Engine, StepLog, copy_bandwidth_gb_s, engine_pass, step_breakdown, weight_bytes
from .hf_baselines import HFBaselines
from .report import add_output_arguments, markdown_table, plot_offline, positive_int_list, run_record, write_outputs
from .roofline import Roofline, VirtualClock

FILLER = "The quick brown fox jumps over the lazy dog. "  # 9 words
SPEC_SLACK_TOKENS = 128  # KV room per sequence beyond prompt + output, for draft tokens under verification
SAME_AS_AR, SAME_AS_BASELINE = "identical_to_autoregressive", "identical_to_baseline"  # a row's output check


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(
        p, ModelConfig, only=["model"], overrides={"model": {"help": "the target, as `leapserve serve --model`"}}
    )
    p.add_argument(
        "--decoders",
        type=decoder_list,
        default=f"{BASELINE},speculative:ngram",
        help="comma-separated: autoregressive | speculative:NAME (" + ", ".join(NAMED_CONFIGS) + ") | "
        "speculative:{JSON speculative config} | dparallel[:{JSON diffusion config}], each optionally LABEL=...; "
        "autoregressive, the baseline of every speedup, is added when missing; a masked diffusion LM takes "
        "dparallel decoders only, the first being the baseline",
    )
    p.add_argument(
        "--batch-sizes",
        type=positive_int_list,
        default="1,2,4,8,16",
        help="comma-separated: prompts generated together",
    )
    p.add_argument(
        "--dataset",
        default="mixed",
        help="chat | code | summarization | math | mixed (the 'test' split), handwritten, or a .jsonl file with "
        "'prompt' or 'messages' per line",
    )
    p.add_argument("--num-prompts", type=int, help="prompts per (decoder, batch size); None: the largest batch")
    p.add_argument(
        "--continuous",
        action="store_true",
        help="submit all prompts at once, at most BATCH running (continuous batching), instead of "
        "generating them in groups of BATCH; use several times the largest batch in --num-prompts",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt at most")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed passes; figures are their median")
    _add_measurement_arguments(p)
    g = p.add_argument_group("engine")
    add_config_arguments(g, ModelConfig, only=["dtype", "device", "model_impl", "enforce_eager"])
    add_config_arguments(
        g,
        CacheConfig,
        only=["kv_cache_tokens"],
        overrides={
            "kv_cache_tokens": {"help": "per engine; default: enough for the largest batch of the longest prompts"}
        },
    )
    add_output_arguments(p)
    p.set_defaults(handler=run)


def _add_measurement_arguments(p: argparse.ArgumentParser) -> None:
    """The seed, long contexts, and what else to measure: baselines, a profile, a modeled accelerator."""
    add_config_arguments(
        p, EngineConfig, only=["seed"], overrides={"seed": {"help": "the prompt order, and the engines' sampling seed"}}
    )
    p.add_argument(
        "--context-words",
        type=int,
        default=0,
        help="prepend about this many words of filler text to every prompt (long-context decoding)",
    )
    p.add_argument(
        "--baselines",
        choices=["none", "hf"],
        default="none",
        help="hf: also transformers' generate, plain, with assistant_model and with prompt lookup",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also split an engine step into matmuls / attention / other (one profiled pass each)",
    )
    p.add_argument(
        "--roofline",
        type=roofline_arg,
        metavar="MS,KNEE[,DRAFT_SHARE]",
        help="time on a modeled accelerator instead of the wall clock: a target forward of T tokens "
        "takes max(MS, MS x T / KNEE) ms, a drafter forward DRAFT_SHARE (default 0.1) of that; "
        "e.g. 10,128",
    )


def roofline_arg(text: str) -> Roofline:
    """argparse type: `--roofline`."""
    try:
        return Roofline.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def prompt_token_ids(tokenizer, prompts: list[str | list[dict]], context_words: int) -> list[list[int]]:
    """Token ids through the chat template (when the tokenizer has one), with optional filler text in front."""
    filler = FILLER * (context_words // 9)
    ids = []
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if filler:
            messages = [{**m, "content": filler + m["content"]} if i == 0 else m for i, m in enumerate(messages)]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            ids.append(tokenizer.encode("\n".join(m["content"] for m in messages)))
    return ids


def kv_tokens_needed(
    prompts: list[list[int]], batch_size: int, max_tokens: int, canvas: int = 0, block_size: int = 16
) -> int:
    """KV cache for `batch_size` sequences of the longest prompt, with room for drafts, a diffusion canvas of
    `canvas` tokens (reserved whole, whatever `max_tokens`) and block rounding."""
    per_seq = max(map(len, prompts)) + max(max_tokens, canvas) + SPEC_SLACK_TOKENS + block_size
    return batch_size * (per_seq + block_size - 1) // block_size * block_size


def build_engine(args: argparse.Namespace, decoder: Decoder, kv_tokens: int) -> Engine:
    """One decoder's engine, on the wall clock or (`--roofline`) a modeled accelerator's virtual clock."""
    steps = StepLog()
    clock = VirtualClock.of(args.roofline) if args.roofline else None
    config = config_from_args(
        EngineConfig,
        args,
        decoder=decoder.kind,
        speculative_config=decoder.speculative_config,
        diffusion_config=decoder.diffusion_config,
    )
    config.cache.kv_cache_tokens, config.scheduler.max_num_seqs = kv_tokens, max(args.batch_sizes)
    llm = LLM(config=config, **({"clock": clock, "observers": [steps, clock]} if clock else {"observers": [steps]}))
    return Engine(llm, steps, clock or time.perf_counter)


def bench(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[list[dict], dict]:
    """Every (batch size, decoder) row, and what the record says about the setup."""
    canvas = max((d.diffusion.gen_length for d in args.decoders if d.diffusion), default=0)
    kv_tokens = args.kv_cache_tokens or kv_tokens_needed(prompts, max(args.batch_sizes), args.max_tokens, canvas)
    engines = {d.label: build_engine(args, d, kv_tokens) for d in args.decoders}
    baseline = args.decoders[0].label  # autoregressive, or the first dparallel decoder: see decoder_list
    diffusion = args.decoders[0].kind == DIFFUSION
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    passes: dict[str, Callable[[list[list[int]], int], Pass | None]] = {
        label: (lambda ps, b, e=e: engine_pass(e, ps, b, params, args.continuous)) for label, e in engines.items()
    }
    base = engines[baseline].llm
    setup: dict = {
        "decoders": {d.label: d.diffusion.as_dict() if d.diffusion else d.speculative_config for d in args.decoders},
        **({"baseline": baseline} if diffusion else {}),
        "batching": "continuous" if args.continuous else "static",
        "roofline": dataclasses.asdict(args.roofline) if args.roofline else None,
    }
    if args.baselines == "hf":
        configs = [d.speculative_config for d in args.decoders if d.speculative_config]
        hf = HFBaselines(base, configs, args.max_tokens, args.ignore_eos)
        passes.update({mode: (lambda ps, b, mode=mode: hf.run(mode, ps, b)) for mode in hf.modes})
        setup["hf_generate_options"] = hf.options
    for run_pass in passes.values():  # warm-up
        run_pass(prompts[:1], 1)
    weights = weight_bytes(base.engine.runner.model)
    setup.update(weight_bytes=weights, copy_GB_s=copy_bandwidth_gb_s(base.engine.device), kv_cache_tokens=kv_tokens)
    rows = []
    bar = tqdm(total=len(args.batch_sizes) * args.repeats * len(passes), desc="bench offline", unit="pass")
    for batch_size in args.batch_sizes:
        runs: dict[str, list[Pass]] = {label: [] for label in passes}
        for _ in range(args.repeats):
            for label, run_pass in passes.items():
                result = run_pass(prompts, batch_size)
                if result is not None:
                    runs[label].append(result)
                    bar.write(pass_line(label, batch_size, result, runs[baseline][-1][1] if runs[baseline] else None))
                bar.update(1)
        for row in batch_rows(runs, baseline, batch_size, weights, SAME_AS_BASELINE if diffusion else SAME_AS_AR):
            if args.profile and row["decoder"] in engines:
                row["step_breakdown"] = step_breakdown(
                    engines[row["decoder"]], prompts, batch_size, params, args.continuous
                )
            rows.append(row)
    bar.close()
    return rows, setup


def pass_line(label: str, batch_size: int, result: Pass, reference: list[list[int]] | None) -> str:
    """A pass's figures as it ends, so that a run cut short still tells what it measured."""
    run, outputs = result
    same = (
        "" if reference is None else f", same output as the baseline's pass: {'yes' if outputs == reference else 'no'}"
    )
    return f"{label} at batch {batch_size}: {run.output_tokens / run.elapsed:.2f} tok/s{same}"


def batch_rows(runs: dict[str, list[Pass]], baseline: str, batch_size: int, weights: int, same_key: str) -> list[dict]:
    """One row per decoder that ran at this batch size: the summary of its repeats against the baseline's, whose
    outputs it matches or not under `same_key`."""
    reference = runs[baseline][-1][1]
    baseline_tps = offline_summary([r for r, _ in runs[baseline]], weights)["tokens_per_s"]
    rows = []
    for label, results in runs.items():
        if not results:
            continue
        summary = offline_summary([r for r, _ in results], weights)
        rows.append(
            {
                "decoder": label,
                "batch_size": batch_size,
                **summary,
                "speedup": speedup(summary["tokens_per_s"], baseline_tps),
                same_key: results[-1][1] == reference,
            }
        )
    return rows


def tables(rows: list[dict], setup: dict) -> str:
    """The results table, and the step breakdown table when profiled."""
    baseline = setup.get("baseline")  # set for dparallel decoders, against the first of them
    headers = [
        "decoder",
        "batch",
        "output tok/s",
        "speedup",
        "steps / token" if baseline else "target forwards / token",
        "mean acceptance length",
        "nodes / draft",
        "weight GB/s",
        "drafting cost (same pass)",
        f"same output as {baseline}" if baseline else "same output as AR",
    ]
    body = [
        [
            r["decoder"],
            r["batch_size"],
            r["tokens_per_s"],
            r["speedup"],
            r["target_forwards_per_token"],
            r["mean_acceptance_length"],
            r.get("nodes_per_draft"),
            r["weight_GB_s"],
            None if r.get("drafting_cost") is None else f"{100 * r['drafting_cost']:+.1f}%",
            "yes" if r[SAME_AS_BASELINE if baseline else SAME_AS_AR] else "no",
        ]
        for r in rows
    ]
    if baseline:  # diffusion decoders draft nothing: no acceptance, no drafting cost
        keep = [
            i
            for i, h in enumerate(headers)
            if h not in ("mean acceptance length", "nodes / draft", "drafting cost (same pass)")
        ]
        headers, body = [headers[i] for i in keep], [[row[i] for i in keep] for row in body]
    batching = (
        "continuous batching (batch: requests running at most)"
        if setup["batching"] == "continuous"
        else "static groups of `batch` prompts"
    )
    text = (
        f"weights: {setup['weight_bytes'] / 1e6:.0f} MB; measured copy bandwidth: {setup['copy_GB_s']:.1f} GB/s; "
        f"{batching}\n\n"
    )
    if baseline:
        text += (
            f"masked diffusion LM: steps / token are the denoising steps (model forwards) a request took per output "
            f"token; speedup and same output are against {baseline}\n\n"
        )
    if setup.get("roofline"):
        text += (
            f"virtual time on a modeled accelerator (`--roofline`): {Roofline(**setup['roofline']).describe()}; "
            f"tok/s, weight GB/s and drafting cost are in that time\n\n"
        )
    text += markdown_table(headers, body)
    profiled = [r for r in rows if "step_breakdown" in r]
    if profiled:
        headers = [
            "decoder",
            "batch",
            "ms/step (profiled)",
            "matmuls",
            "attention",
            "rest of the model",
            "bookkeeping",
            "rest + bookkeeping",
        ]
        body = [
            [r["decoder"], r["batch_size"], *split.values(), f"{100 * overhead_share(split):.1f}%"]
            for r in profiled
            for split in [r["step_breakdown"]]
        ]
        text += "\n\n" + markdown_table(headers, body)
    return text


def overhead_share(split: dict[str, float]) -> float:
    """The rest of the model and bookkeeping together, as a share of a step (`step_breakdown`)."""
    return (split["rest_of_model_ms"] + split["bookkeeping_ms"]) / split["ms_per_step"]


def run(args: argparse.Namespace) -> None:
    """The `leapserve bench offline` handler."""
    num_prompts = args.num_prompts or max(args.batch_sizes)
    if args.continuous and args.baselines == "hf":
        sys.exit(
            "leapserve bench offline: error: --baselines hf cannot run --continuous (transformers' generate "
            "has no continuous batching)"
        )
    if args.baselines == "hf" and args.decoders[0].kind == DIFFUSION:
        sys.exit(
            "leapserve bench offline: error: --baselines hf runs transformers' autoregressive generate, which "
            "cannot decode a masked diffusion LM: leave it out with dparallel decoders"
        )
    if args.roofline and (args.baselines == "hf" or args.profile):
        sys.exit(
            "leapserve bench offline: error: --roofline times the engine's forwards only: it cannot time "
            "--baselines hf or --profile"
        )
    try:
        tokenizer = load_tokenizer(resolve_model(args.model))
        texts = load_prompts(args.dataset, "test", num_prompts, args.seed)
    except (OSError, ValueError) as e:
        sys.exit(f"leapserve bench offline: error: {e}")
    if not texts:
        sys.exit(f"leapserve bench offline: error: no prompts in {args.dataset!r}")
    if len(texts) < num_prompts:
        print(f"{args.dataset} has {len(texts)} prompts: repeating them to {num_prompts}", file=sys.stderr)
        texts = [texts[i % len(texts)] for i in range(num_prompts)]
    prompts = prompt_token_ids(tokenizer, texts, args.context_words)
    rows, setup = bench(args, prompts)
    record = run_record(
        "offline",
        args,
        rows,
        num_prompts=len(prompts),
        mean_prompt_tokens=sum(map(len, prompts)) / len(prompts),
        **setup,
    )
    write_outputs(record, tables(rows, setup), args.output_json, args.output_md)
    if args.output_json is not None:
        plot = Path(args.output_json).with_suffix(".png")
        batching = "continuous batching" if args.continuous else "static groups"
        modeled = "" if args.roofline is None else f"\nvirtual time: {args.roofline.describe()}"
        against = f"\nspeedup over {setup['baseline']}" if "baseline" in setup else ""
        plot_offline(
            rows,
            plot,
            f"{args.model}, {len(prompts)} prompts from {args.dataset}, "
            f"{args.max_tokens} tokens max, greedy, {batching}{modeled}{against}",
            "requests running at most" if args.continuous else "batch size",
        )
        print(f"wrote {plot}")
