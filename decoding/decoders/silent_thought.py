"""Silent-thought decoding (DART-style checkpoints, `silent_thought.py`): the reasoning happens in the prefill.

A request's prompt is expanded at admission by its pathway (`SamplingParams.extra_args["reasoning"]`, default the
checkpoint's `reasoning`), then decoded autoregressively with the cache:

* `st`: `prompt ⊕ separator ⊕ K placeholders ⊕ answer_prompt`; the placeholder positions take the learned ST vectors
  (`SeqChunk.extra["embeds"]`), and with `layer_adapter` the REM hooks act on them (`extra["st_rows"]`) in the same
  prefill, chunked or not.
* `direct`: `prompt ⊕ separator ⊕ answer_prompt`, no ST.
* `cot`: `prompt ⊕ separator`; the model writes its chain of thought and answer.

Jacobi REM (`rem_mode` jacobi, R iterations): in the step whose prompt chunk reaches the end of the ST region, the
sequence's forwards are (1) its chunk up to the last ST position (from the first ST position at least, so all K
final-norm hidden states `h_0` are at hand), (2) R forwards of the K ST positions alone over the same cache slots,
pass t with inputs `z_t = z_0 + mlp(h_{t-1})`, and (3) the rest of the chunk (the answer prompt) over the refined
ST K/V. Other sequences take part in (1) only; each forward of (2) and (3) batches every sequence refining in the
step. Cost: R + 1 extra forwards, R of them of K tokens a sequence.
"""

from __future__ import annotations

import torch

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..observe import Observers
from ..request import Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sampler, SequenceError
from ..sampling_params import SamplingParams
from ..scheduler import ScheduledSeq
from ..silent_thought import CONFIG_KEY, REASONING, load_silent_thought, text_ids
from .base import Decoder, SeqStep

REASONING_ARG = "reasoning"  # SamplingParams.extra_args key


class SilentThoughtDecoder(Decoder):
    name = "silent-thought"
    model_impl = "transformers"  # input embeddings and REM hooks run on transformers' modules

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig, observers: Observers):
        super().__init__(runner, sampler, config, observers)
        model, hf = runner.model, runner.model.config
        loaded = None
        if getattr(hf, CONFIG_KEY, None) is not None:
            loaded = load_silent_thought(
                str(model.name_or_path), hf.hidden_size, hf.num_hidden_layers, runner.device, model.dtype
            )
        if loaded is None:
            raise ValueError(
                f'--decoder silent-thought needs a silent-thought checkpoint (config.json with a "silent_thought" '
                f"entry and silent_thought.safetensors, docs/silent-thought.md); {config.model.model} has none"
            )
        self.st_config, self.st = loaded
        self.st.install(model)
        tokenizer = sampler.tokenizer
        self.separator_ids = text_ids(tokenizer, self.st_config.separator)
        self.answer_ids = text_ids(tokenizer, self.st_config.answer_prompt)
        self.placeholder = tokenizer.eos_token_id or 0  # any valid id: its embedding is replaced
        self.num_thoughts = self.st_config.num_thoughts
        self.iterations = self.st_config.jacobi_iterations
        self.adapters = self.st_config.rem_mode == "layer_adapter"

    def reasoning(self, params: SamplingParams) -> str:
        """The request's pathway; InvalidRequestError (param "reasoning") for an unknown one."""
        value = (params.extra_args or {}).get(REASONING_ARG, self.st_config.reasoning)
        if value not in REASONING:
            raise InvalidRequestError(f"reasoning must be one of {', '.join(REASONING)}, got {value!r}", REASONING_ARG)
        return value

    def expand_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        reasoning = self.reasoning(params)
        if reasoning == "cot":
            return prompt_ids + self.separator_ids
        if reasoning == "direct":
            return prompt_ids + self.separator_ids + self.answer_ids
        return prompt_ids + self.separator_ids + [self.placeholder] * self.num_thoughts + self.answer_ids

    def validate(self, prompt_len: int, params: SamplingParams, max_model_len: int) -> None:
        if params.prompt_logprobs is not None:
            raise InvalidRequestError(
                "the silent-thought decoder does not support prompt_logprobs (its prompt holds inserted positions)",
                "prompt_logprobs",
            )

    def st_start(self, seq: Sequence) -> int | None:
        """Where the sequence's K ST positions begin; None for the cot and direct pathways."""
        if self.reasoning(seq.params) != "st":
            return None
        return seq.prompt_len - len(self.answer_ids) - self.num_thoughts

    def _chunk(self, seq: Sequence, lo: int, hi: int, logits: bool, z: torch.Tensor | None = None) -> SeqChunk:
        """Tokens `[lo, hi)` of `seq`; ST positions among them take the rows of `z` `[K, d]` (default the learned
        vectors) and, with layer adapters, the REM."""
        chunk = SeqChunk(seq.block_table, lo, seq.token_ids[lo:hi], [hi - lo - 1] if logits else [])
        st = self.st_start(seq)
        if st is not None and lo < st + self.num_thoughts and st < hi:
            a, b = max(lo, st), min(hi, st + self.num_thoughts)
            vectors = (self.st.embeddings if z is None else z)[a - st : b - st]
            rows = list(range(a - lo, b - lo))
            chunk.extra["embeds"] = (rows, vectors)
            if self.adapters:
                chunk.extra["st_rows"] = rows
        return chunk

    @torch.inference_mode()
    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        k = self.num_thoughts
        results = {s.seq: SeqStep(sequential_forwards=1) for s in scheduled}
        chunks: list[SeqChunk] = []
        refining: list[tuple[ScheduledSeq, int, int]] = []  # (scheduled, ST start, its first ST row in `hidden`)
        row = 0
        for s in scheduled:
            seq, lo, hi = s.seq, s.seq.num_computed, s.seq.num_computed + s.num_new
            st = self.st_start(seq)
            if self.iterations and st is not None and lo < st + k <= hi:  # the ST region is complete in this step
                chunks.append(self._chunk(seq, min(lo, st), st + k, logits=False))
                refining.append((s, st, row + st - min(lo, st)))
            else:
                chunks.append(self._chunk(seq, lo, hi, logits=s.completes_prefix))
            row += len(chunks[-1].token_ids)
        logits, hidden = self.runner.forward(chunks)
        rows = _rows_by_seq([s.seq for s in scheduled], chunks, logits)
        if refining:
            rows.update(self._refine(refining, hidden, results))
        sampling = [s.seq for s in scheduled if s.completes_prefix]
        if sampling:
            samples = self.sampler.sample(torch.stack([rows[seq] for seq in sampling]), sampling)
            for seq, sample in zip(sampling, samples):
                if isinstance(sample, SequenceError):
                    results[seq].error = sample
                else:
                    results[seq].samples, results[seq].forwarded = [sample], True
        return results

    def _refine(
        self, refining: list[tuple[ScheduledSeq, int, int]], hidden: torch.Tensor, results: dict[Sequence, SeqStep]
    ) -> dict[Sequence, torch.Tensor]:
        """Jacobi: R re-runs of each refining sequence's ST positions, then the rest of its chunk; the logits rows
        `[V]` of those that complete their prefix."""
        k = self.num_thoughts
        seqs = [s.seq for s, _, _ in refining]
        ends = [s.seq.num_computed + s.num_new for s, _, _ in refining]  # where each step's chunk ends
        h = torch.stack([hidden[r : r + k] for _, _, r in refining])  # [P, K, d]: h_0
        out: dict[Sequence, torch.Tensor] = {}
        for t in range(1, self.iterations + 1):
            z = self.st.refine(self.st.embeddings, h)  # [P, K, d]: z_t
            # an ST region that ends the prompt (no answer prompt) has its logits from the last pass
            chunks = [
                self._chunk(s.seq, st, st + k, t == self.iterations and s.completes_prefix and st + k == end, z_t)
                for (s, st, _), end, z_t in zip(refining, ends, z)
            ]
            logits, hidden = self.runner.forward(chunks)
            h = hidden.view(len(refining), k, -1)
            out.update(_rows_by_seq(seqs, chunks, logits))
        rest = [(s, st + k, end) for (s, st, _), end in zip(refining, ends) if st + k < end]
        if rest:
            chunks = [self._chunk(s.seq, a, end, s.completes_prefix) for s, a, end in rest]
            logits, _ = self.runner.forward(chunks)
            out.update(_rows_by_seq([s.seq for s, _, _ in rest], chunks, logits))
        for seq in seqs:
            results[seq].sequential_forwards += self.iterations
        for s, _, _ in rest:
            results[s.seq].sequential_forwards += 1
        return out


def _rows_by_seq(seqs: list[Sequence], chunks: list[SeqChunk], logits: torch.Tensor) -> dict[Sequence, torch.Tensor]:
    """The logits row `[V]` of each sequence whose chunk asked for one (`logits` `[N, V]`, at most one a chunk)."""
    return dict(zip([seq for seq, c in zip(seqs, chunks) if c.logits_rows], logits))
