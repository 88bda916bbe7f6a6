"""Where an unprofiled decode step's time goes at one request, by timing its parts alone.

    python -m leapserve.benchmarks.step_ablation           # SmolLM2, leapserve's Llama compiled

`bench offline --profile` splits a step under torch.profiler, whose cost per recorded operator (about a
microsecond) inflates the parts made of many small operators. Here nothing is profiled: after every engine step
of one greedy request, its parts are timed alone, so that they share the machine's state of the moment:

- step: `LLMEngine.step()`; forward: the runner's forward within it (model, LM head, the step's metadata);
- GEMMs: every `PackedLinear` of leapserve's Llama (the LM head included) called once on one row, eagerly;
- attention: every layer's attention as the model runs it (compiled: the op in its graph; eager: `attend_layer`),
  one token over the step's context length, in a scratch cache.

The rest of the model is the forward less the GEMMs and attention, bookkeeping the step less the forward; each a
median over the steps. Eager GEMM calls skip the compiled graph's custom-op dispatch (about 2 us a call), which
therefore counts as the rest of the model here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.attention import attend_layer, forward_context, paged_attention_op
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.runner import SeqChunk, step_metadata
from leapserve.decoding.step_buffers import StepBuffers
from leapserve.kernels.packed_linear import PackedLinear

PROMPT = "Write a long story about a cat who learns to fly over the mountains."


def split_steps(llm: LLM, steps: int, warmup: int = 8) -> tuple[dict[str, float], list[int]]:
    """Median milliseconds of the step, its forward, the GEMMs alone and attention alone over `steps` decode steps
    of one greedy request (after `warmup` steps), the rest of the model and bookkeeping derived from them; and the
    request's output token ids."""
    engine, runner = llm.engine, llm.engine.runner
    llama = runner.llama
    if llama is None:
        raise ValueError("the ablation times leapserve's Llama: this model runs on transformers' modules")
    rows = [(m, torch.zeros(1, m.weight.shape[1])) for m in llama.modules() if isinstance(m, PackedLinear)]
    block = llama.blocks[0]
    heads, kv_heads = block.q_size // block.head_dim, block.kv_size // block.head_dim
    prompt = llm.tokenizer.encode(PROMPT)
    bs = runner.cache.block_size
    scratch = PagedKVCache(
        len(llama.blocks), (len(prompt) + warmup + steps) // bs + 2, bs, kv_heads, block.head_dim,
        runner.cache.k[0].dtype, runner.device,
    )  # fmt: skip
    q, kv = torch.zeros(1, heads, block.head_dim), torch.zeros(1, kv_heads, block.head_dim)
    buffers = StepBuffers(runner.device)

    forward_seconds: list[float] = []
    run_forward = runner.forward

    def timed_forward(chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        out = run_forward(chunks)
        forward_seconds.append(time.perf_counter() - start)
        return out

    times: dict[str, list[float]] = {"step": [], "forward": [], "GEMMs": [], "attention": []}
    engine.add_request("ablation", prompt, SamplingParams(temperature=0, max_tokens=warmup + steps, ignore_eos=True))
    runner.forward = timed_forward  # type: ignore[method-assign]
    output: list[int] = []
    try:
        for i in range(warmup + steps):
            start = time.perf_counter()
            changed = engine.step()
            step = time.perf_counter() - start
            output = changed[0].output().outputs[0].token_ids if changed else output
            with torch.inference_mode():
                start = time.perf_counter()
                for linear, row in rows:
                    linear(row)
                gemms = time.perf_counter() - start
                context = len(prompt) + i
                meta, _, _ = step_metadata(
                    [SeqChunk(list(range(context // bs + 1)), context, [0], [0])], scratch, buffers
                )
                start = time.perf_counter()
                if runner.compile:  # the op the compiled graph calls (C++ on CPU), its step pushed as the runner does
                    with forward_context(meta):
                        for layer in range(len(llama.blocks)):
                            paged_attention_op(q, kv, kv, layer, block.scale)
                else:
                    for layer in range(len(llama.blocks)):
                        attend_layer(meta, q, kv, kv, layer, block.scale)
                attention = time.perf_counter() - start
            if i >= warmup:
                for key, value in zip(times, (step, forward_seconds[-1], gemms, attention)):
                    times[key].append(value)
    finally:
        del runner.forward
    split = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    split["rest of the model"] = split["forward"] - split["GEMMs"] - split["attention"]
    split["bookkeeping"] = split["step"] - split["forward"]
    return split, output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=60, help="decode steps timed (after 8 of warm-up)")
    parser.add_argument("--enforce-eager", action="store_true", help="leapserve's Llama eagerly, not compiled")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        split, _ = split_steps(LLM(args.model, decoder="autoregressive", enforce_eager=args.enforce_eager), args.steps)
    except (ValueError, OSError) as e:  # a model it cannot time, or cannot load
        parser.error(str(e))
    share = (split["rest of the model"] + split["bookkeeping"]) / split["step"]
    keys = ["step", "GEMMs", "attention", "rest of the model", "bookkeeping"]
    print("| " + " | ".join(f"{k} (ms)" for k in keys) + " | rest + bookkeeping |")
    print("|" + "---|" * (len(keys) + 1))
    print("| " + " | ".join(f"{split[k]:.2f}" for k in keys) + f" | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
