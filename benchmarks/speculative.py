"""Speculative vs autoregressive decoding on the same engine: output tokens/s and mean acceptance length,
greedy, per batch size and layout (packed = EMS-SD, padded = the vanilla baseline's input padding).

    python -m leapserve.benchmarks.speculative --model smollm2-135m-instruct --max-tokens 64 --batch-sizes 1,8
"""
from __future__ import annotations

import argparse
import json
import time

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.model_loader import resolve_model

from .engine_vs_hf import PROMPTS

# Prompts whose answers copy from the prompt, where n-gram lookup has something to find.
COPY_PROMPTS = [
    "Repeat this sentence exactly, then repeat it again: The quick brown fox jumps over the lazy dog near the river.",
    "Rewrite this Python code with a docstring added:\ndef add(a, b):\n    total = a + b\n    return total\n",
    "Copy this list and number each item: apples, bananas, cherries, dates, elderberries, figs, grapes.",
    "Quote the first line verbatim: 'To be, or not to be, that is the question.' Then explain it.",
]


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(output tokens/s, mean acceptance length) over one batch."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    forwards = sum(o.metrics.target_forwards for o in outs)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    return tokens / elapsed, (forwards + accepted) / forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decoders", default=None, help="comma-separated subset of the decoders below (default: all)")
    args = ap.parse_args()
    target = str(resolve_model(args.model))
    configs = {
        "autoregressive": None,
        "ngram-packed": {"method": "ngram", "num_speculative_tokens": args.k},
        "ngram-padded": {"method": "ngram", "num_speculative_tokens": args.k, "layout": "padded"},
        "self-draft-packed": {"method": "draft_model", "model": target, "num_speculative_tokens": args.k},
        "self-draft-padded": {"method": "draft_model", "model": target, "num_speculative_tokens": args.k,
                              "layout": "padded"},
    }
    chosen = args.decoders.split(",") if args.decoders else list(configs)
    for name in chosen:
        spec = configs[name]
        llm = LLM(args.model, speculative_config=spec, kv_cache_tokens=16384, max_model_len=1024)
        conversations = [[{"role": "user", "content": p}] for p in COPY_PROMPTS + PROMPTS]
        prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                                          tokenize=False), add_special_tokens=False)
                   for c in conversations]
        run(llm, prompts[:1], 8)  # warm-up
        for b in (int(x) for x in args.batch_sizes.split(",")):
            results = [run(llm, prompts[:b], args.max_tokens) for _ in range(args.repeats)]
            best = max(results)
            print(json.dumps({"decoder": name, "batch": b, "tokens_per_s": round(best[0], 1),
                              "mean_acceptance_length": round(best[1], 2)}), flush=True)


if __name__ == "__main__":
    main()
