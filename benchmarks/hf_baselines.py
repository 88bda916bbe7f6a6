"""`transformers`' `generate` on the engine's checkpoint, as baselines for `leapserve bench offline --baselines hf`."""

from __future__ import annotations

import time

import torch

from leapserve.decoding import LLM
from leapserve.drafters.checkpoints import load_draft_model

from .bench_metrics import OfflineRun, Pass

DEFAULT_NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


class HFBaselines:
    """transformers' `generate` on the engine's checkpoint: plain, with a draft model (`assistant_model`, from the
    first draft_model config) and with prompt lookup (sized like the first ngram config)."""

    def __init__(self, llm: LLM, configs: list[dict], max_tokens: int, ignore_eos: bool):
        from transformers import AutoModelForCausalLM

        engine = llm.engine
        self.model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=engine.dtype).to(engine.device)
        self.model.eval()
        self.forwards = 0
        self.model.register_forward_hook(self._count)
        self.eos = engine.eos_token_ids
        self.pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else min(self.eos)
        self.device = engine.device
        self.common = {
            "max_new_tokens": max_tokens,
            "do_sample": False,
            "pad_token_id": self.pad,
            **({"min_new_tokens": max_tokens} if ignore_eos else {}),
        }
        ngram = next((c for c in configs if c["method"] == "ngram"), DEFAULT_NGRAM)
        self.modes: dict[str, dict] = {
            "hf-generate": {},
            "hf-prompt-lookup": {
                "prompt_lookup_num_tokens": ngram.get("num_speculative_tokens") or 4,
                "max_matching_ngram_size": ngram.get("prompt_lookup_max", 4),
            },
        }
        self.options = {mode: dict(kwargs) for mode, kwargs in self.modes.items()}  # for the record
        draft = next((c for c in configs if c["method"] == "draft_model"), None)
        if draft is not None:
            # a draft that shares the target's embedding and head (AdaSPEC) gets them from this model
            assistant = load_draft_model(draft["model"], self.model, engine.device, engine.dtype)
            k = draft.get("num_speculative_tokens") or 4
            self.modes["hf-assisted"] = {"assistant_model": assistant, "num_assistant_tokens": k}
            self.options["hf-assisted"] = {"assistant_model": draft["model"], "num_assistant_tokens": k}

    def _count(self, *_) -> None:
        self.forwards += 1

    @torch.inference_mode()
    def run(self, mode: str, prompts: list[list[int]], batch_size: int) -> Pass | None:
        """All prompts through `generate` in left-padded groups of `batch_size`; None where transformers cannot
        (assisted modes need batch size 1)."""
        if mode != "hf-generate" and batch_size > 1:
            return None
        tokens: list[list[int]] = []
        forwards = request_forwards = 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            group = prompts[i : i + batch_size]
            width = max(map(len, group))
            ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in group], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=self.device)
            before = self.forwards
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self.common, **self.modes[mode])
            forwards += self.forwards - before
            request_forwards += (self.forwards - before) * len(group)  # finished rows ride along to the end
            tokens += [self._until_eos(row[width:].tolist()) for row in out]
        elapsed = time.perf_counter() - start
        return OfflineRun(
            output_tokens=sum(map(len, tokens)),
            elapsed=elapsed,
            target_forwards=forwards,
            request_forwards=request_forwards,
        ), tokens

    def _until_eos(self, row: list[int]) -> list[int]:
        """A generated row up to and including its first end-of-sequence token (the rest is padding)."""
        for i, token in enumerate(row):
            if token in self.eos:
                return row[: i + 1]
        return row
