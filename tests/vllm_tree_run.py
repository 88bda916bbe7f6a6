"""Run in `.venv-vllm` by test_vllm_trees.py: one offline vLLM engine (fp32, eager, in this process) generating from
token-id prompts, with or without speculation, on leapserve's tree worker when asked. On stdin: a JSON object
{"model", "speculative_config" (or null), "tree_worker" (bool), "prompts" (lists of ids), "params" (one dict of
vLLM sampling parameters per prompt), "max_num_seqs"}. Prints one JSON line: the output token ids per prompt and
the speculative-decoding counters."""

from __future__ import annotations

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def main() -> None:
    job = json.load(sys.stdin)
    kwargs = {
        "model": job["model"],
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 256,
        "max_num_seqs": job.get("max_num_seqs", 8),
        "seed": 0,
        "disable_log_stats": False,
    }
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    if job.get("tree_worker"):
        kwargs["worker_cls"] = "leapserve.vllm_plugin.tree_runner.TreeCPUWorker"
    llm = LLM(**kwargs)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    outs = llm.generate(prompts, [SamplingParams(**p) for p in job["params"]], use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    counters = {n: getattr(metrics.get(f"vllm:spec_decode_{n}"), "value", 0) for n in COUNTERS}
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "counters": counters}))


if __name__ == "__main__":
    main()
