"""Turns target logits into tokens per sequence: penalties, logits processors, temperature, top-k/top-p, seeds,
logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import Logprob
from .request import Sequence


class SequenceError(RuntimeError):
    """Processing one sequence failed (e.g. its logits processor raised); only its request should fail."""

    def __init__(self, seq: Sequence, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seq = seq


def apply_penalties(logits: torch.Tensor, seq: Sequence, output_ids: list[int]) -> torch.Tensor:
    """`logit_bias`, then the repetition penalty over the prompt and the tokens generated so far (`output_ids`), then
    OpenAI's presence and frequency penalties over the generated ones; before `min_tokens`, no stop token."""
    p = seq.params
    if len(output_ids) < p.min_tokens and seq.request.stop_ids:
        logits = logits.index_fill(0, torch.tensor(sorted(seq.request.stop_ids), device=logits.device), float("-inf"))
    if p.logit_bias:
        bias = torch.zeros_like(logits)
        bias[list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits + bias
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.request.prompt_token_ids + output_ids, device=logits.device).unique()
        scores = logits[seen]
        logits = logits.index_put(
            (seen,), torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        )
    if not (p.presence_penalty or p.frequency_penalty) or not output_ids:
        return logits
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def plain_greedy(seq: Sequence) -> bool:
    """Greedy on the raw logits: no penalties and no logits processors change what the argmax sees."""
    return seq.params.greedy and not seq.params.processes_logits


def row_argmax(logits: torch.Tensor, seqs: list[Sequence]) -> list[int] | None:
    """Every row's argmax in one call where some of `seqs` (the rows' sequences) is `plain_greedy`, else None:
    one op per row costs mostly its overhead on a CPU. `max`'s indices are the argmax, the first of equal maxima as
    documented, and on CPU 3-4x faster to compute (one bf16 row of SmolLM2's 49,152 logits: 39 us against 169)."""
    return logits.max(dim=-1).indices.tolist() if any(map(plain_greedy, seqs)) else None


def processed_logits(logits: torch.Tensor, seq: Sequence, pending: list[int] | None = None) -> torch.Tensor:
    """Logits after penalties, the request's logits processors and its grammar (what greedy takes the argmax of).

    `pending`: tokens not yet committed that precede this position (a draft path), counted as generated output.
    """
    output_ids = seq.output_ids + pending if pending else seq.output_ids
    logits = apply_penalties(logits, seq, output_ids)
    for proc in seq.params.logits_processors:
        try:
            logits = proc(seq.request.prompt_token_ids, output_ids, logits)
        except Exception as e:
            raise SequenceError(seq, e) from e
    if seq.grammar is not None:
        logits = seq.grammar.mask(logits, pending)
    return logits


def target_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, min-p and top-p (nucleus) truncation;
    `logits` `[V]`, or `[N, V]` for N positions at once."""
    p = seq.params
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs /= probs.sum(dim=-1, keepdim=True)
    if p.top_p < 1.0:
        probs = nucleus(probs, p.top_p)
    return probs


def nucleus(probs: torch.Tensor, top_p: float, first: int = 64) -> torch.Tensor:
    """`probs` (`[V]` or `[N, V]`) kept where the mass of the likelier tokens before it is at most `top_p`, then
    renormalised. The likeliest tokens are taken `first` at a time, four times as many while they hold no more than
    `top_p` (a whole sort of SmolLM2's 49,152 costs about 5 ms on a CPU; an LM's nucleus is mostly a few tokens)."""
    k = min(first, probs.shape[-1])
    while True:
        top, order = torch.topk(probs, k)  # descending
        cum = torch.cumsum(top, dim=-1)
        if k == probs.shape[-1] or bool((cum[..., -1] > top_p).all()):  # every token beyond is dropped
            break
        k = min(4 * k, probs.shape[-1])
    kept = top.masked_fill(cum - top > top_p, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, kept)
    return out / out.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One sample from `probs` `[V]`: its CDF inverted at one uniform of `generator` (so a seeded request draws the
    same token in any batch). A cumulative sum and a binary search: on a CPU a race of V exponentials cost about 20
    times as much (1.6 ms a token over SmolLM2's 49,152)."""
    cdf = torch.cumsum(probs, dim=0, dtype=torch.float64)
    total = cdf[-1:]
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * total
    # below the total, so that the first entry above it is a token of positive probability
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    # probabilities all 0 or NaN (a logits processor that masks every token) find no entry: still a valid id
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[-1] - 1)


@dataclass
class Sample:
    token_id: int
    logprobs: dict[int, Logprob] | None


class Sampler:
    def __init__(self, tokenizer, generator: torch.Generator):
        self.tokenizer = tokenizer
        self.generator = generator  # shared RNG for requests without a seed

    def token_logprobs(self, raw_logits: torch.Tensor, token_id: int, k: int) -> dict[int, Logprob]:
        """The model's log-probabilities (before any processing) of the chosen token and the top k."""
        logp = torch.log_softmax(raw_logits, dim=-1)
        chosen = float(logp[token_id])
        out = {token_id: Logprob(chosen, int((logp > chosen).sum()) + 1, self.tokenizer.decode([token_id]))}
        if k:
            top = torch.topk(logp, k)
            for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                out.setdefault(tid, Logprob(lp, rank, self.tokenizer.decode([tid])))
        return out

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample | SequenceError]:
        """One next token per row of `logits` `[N, V]` (row i belongs to `seqs[i]`); a failing row yields its error."""
        samples: list[Sample | SequenceError] = []
        argmax = row_argmax(logits, seqs)
        for i, (raw, seq) in enumerate(zip(logits, seqs)):
            if argmax is not None and plain_greedy(seq):
                token = argmax[i]
            else:
                try:
                    processed = processed_logits(raw, seq)
                except SequenceError as e:
                    samples.append(e)
                    continue
                if seq.params.greedy:
                    token = int(torch.argmax(processed))
                else:
                    token = draw(target_probs(processed, seq), seq.generator or self.generator)
            k = seq.params.logprobs
            samples.append(Sample(token, None if k is None else self.token_logprobs(raw, token, k)))
        return samples
