"""Output tokens/s of the leapserve engine against transformers' `generate`, same model, prompts and run.

    python -m leapserve.benchmarks.engine_vs_hf --model smollm2-135m-instruct --max-tokens 64 --batch-sizes 1,8
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from leapserve.decoding import LLM, SamplingParams

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright while moving.",
    "List five tips for writing clear Python code.",
    "What causes the seasons on Earth?",
    "Describe the water cycle to a ten-year-old.",
    "Why do cats purr?",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "How does a refrigerator keep food cold?",
]


def hf_tokens_per_s(model, tokenizer, prompts: list[str], max_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / elapsed


def engine_tokens_per_s(llm: LLM, prompts: list[str], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def copy_bandwidth_gb_s(num_bytes: int = 256 * 2**20) -> float:
    """Measured memory copy bandwidth (read + write), the roofline a decode step's weight stream is read against."""
    src = torch.empty(num_bytes // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


def step_breakdown(llm: LLM, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """Where a generation's time goes, per engine step: matmuls, paged attention, and everything else."""
    from torch.profiler import ProfilerActivity, profile

    from leapserve.decoding import attention

    attention.PROFILE = True
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    forwards = llm.engine.runner.num_forwards
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    attention.PROFILE = False
    steps = llm.engine.runner.num_forwards - forwards
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    matmul = totals.get("aten::linear", 0.0) / 1e3
    attention = totals.get("leapserve.attention", 0.0) / 1e3
    per_step = wall * 1e3 / steps
    return {"steps": steps, "ms_per_step": round(per_step, 2), "matmul_ms": round(matmul / steps, 2),
            "attention_ms": round(attention / steps, 2),
            "other_ms": round(per_step - (matmul + attention) / steps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--context-words", type=int, default=0,
                    help="prepend this many words of filler text to every prompt (long-context decoding)")
    ap.add_argument("--repeats", type=int, default=5, help="median of N interleaved runs for each figure")
    ap.add_argument("--profile", action="store_true", help="also split an engine step into matmul/attention/other")
    args = ap.parse_args()
    llm = LLM(args.model)  # the serving defaults (KV cache for 32k tokens on CPU)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_path, dtype=torch.float32).eval()
    engine_tokens_per_s(llm, PROMPTS[:1], 8)  # warm-up both
    hf_tokens_per_s(hf, llm.tokenizer, PROMPTS[:1], 8)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in hf.parameters()}.values())
    rows = []
    for bs in map(int, args.batch_sizes.split(",")):
        filler = " ".join(["The quick brown fox jumps over the lazy dog."] * (args.context_words // 9))
        prompts = [(filler + "\n\n" if filler else "") + PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        # Interleaved, so that drift on a shared machine hits both alike; the median of each.
        runs = [(engine_tokens_per_s(llm, prompts, args.max_tokens), hf_tokens_per_s(hf, llm.tokenizer, prompts,
                                                                                  args.max_tokens))
                for _ in range(args.repeats)]
        eng, ref = (statistics.median(r[i] for r in runs) for i in (0, 1))
        # Every decode step streams all weights once: bytes x steps/s is the bandwidth the engine achieves.
        rows.append({"batch": bs, "engine_tok_s": round(eng, 2), "hf_generate_tok_s": round(ref, 2),
                     "speedup": round(eng / ref, 3), "engine_weight_GB_s": round(weight_bytes * eng / bs / 1e9, 1)})
        if args.profile:
            rows[-1]["step_breakdown"] = step_breakdown(llm, prompts, args.max_tokens)
    copy_bw = copy_bandwidth_gb_s()
    print(f"weights: {weight_bytes / 1e6:.0f} MB; measured copy bandwidth: {copy_bw:.1f} GB/s")
    print("| batch | leapserve tok/s | transformers generate tok/s | ratio | leapserve weight GB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['engine_tok_s']} | {r['hf_generate_tok_s']} | {r['speedup']} | "
              f"{r['engine_weight_GB_s']} |")
    if args.profile:
        print("\n| batch | ms/step (profiled) | matmuls | attention | other ops + Python |\n|---|---|---|---|---|")
        for r in rows:
            b = r["step_breakdown"]
            print(f"| {r['batch']} | {b['ms_per_step']} | {b['matmul_ms']} | {b['attention_ms']} | {b['other_ms']} |")
    print(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "context_words": args.context_words,
                      "weight_bytes": weight_bytes, "copy_GB_s": round(copy_bw, 1), "threads": torch.get_num_threads(),
                      "machine": platform.platform(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
