"""Masked diffusion LMs (LLaDA, Dream, leapserve's own) decoded semi-autoregressively, several tokens per step
(dParallel's entropy threshold, LLaDA's low-confidence schedule, or k per step: `diffusion.py`).

Each sequence owns a canvas of `gen_length` tokens after its prompt, all masked at first. A step runs the model
bidirectionally (an all-true `tree_mask`) over the sequence, reads the logits of the current block's masked
positions, and commits some of them; a block is finished when none is masked, then the next starts. Requests
decode together, each at its own block, in one packed forward. Committed tokens are never remasked, so each newly
contiguous committed prefix of the canvas is handed to the engine at once (streaming, stop strings, EOS and
`max_tokens` end a request as for any decoder).

Cache slots: `none` writes the whole sequence's K/V every step (exact). `prefix` and `dual` run the whole sequence
at a block's first step, then only the block and what follows it (`prefix`) or only the block (`dual`); `dual` lays
the sequence out in the cache as prefix, suffix, block (rotary positions are given per token, and bidirectional
attention does not care about slot order), so a block-only step attends cached prefix and suffix as its context.
With shifted logits (Dream) the window starts one token before the block, whose row predicts the block's first token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..diffusion import EXTRA_ARG_PREFIX, DiffusionConfig, choose, gumbel_argmax, transfer_counts
from ..diffusion_lm import DiffusionSpec, diffusion_spec
from ..errors import InvalidRequestError
from ..observe import Observers
from ..request import Sequence
from ..runner import ModelRunner, SeqChunk
from ..sampler import Sample, Sampler
from ..sampling_params import SamplingParams
from ..scheduler import ScheduledSeq
from .base import Decoder, SeqStep


@dataclass(eq=False)
class Canvas:
    """One sequence's generation: `tokens` `[gen_length]` (the mask id where undecided), decoded block by block."""

    config: DiffusionConfig
    tokens: list[int]
    block: int = 0  # the block being decoded
    block_step: int = 0  # steps taken in it
    schedule: list[int] = field(default_factory=list)  # confidence: tokens per step in this block
    emitted: int = 0  # leading canvas tokens handed to the engine
    cached: bool = False  # prefix/dual: this block's context K/V are in the cache


class DParallelDecoder(Decoder):
    name = "dparallel"

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig, observers: Observers):
        super().__init__(runner, sampler, config, observers)
        spec = diffusion_spec(runner.model.config)
        if spec is None:
            raise ValueError(
                "--decoder dparallel needs a masked diffusion LM (a LLaDA or Dream checkpoint, or one whose "
                'config.json has "diffusion_lm"); this model is autoregressive'
            )
        self.spec: DiffusionSpec = spec
        # the server's --diffusion-config over the checkpoint's defaults
        self.diffusion = DiffusionConfig.from_dict({**(spec.decoding or {}), **(config.diffusion_config or {})})
        self.lookahead = self.diffusion.gen_length  # the canvas's cache slots, reserved with the prompt's
        self.canvases: weakref.WeakKeyDictionary[Sequence, Canvas] = weakref.WeakKeyDictionary()

    def slots_ahead(self, seq: Sequence) -> int:
        """The canvas positions not yet handed to the engine (every step writes K/V for the whole canvas)."""
        return self._canvas(seq).config.gen_length - seq.num_output

    def validate(self, prompt_len: int, params: SamplingParams, max_model_len: int) -> None:
        cfg = self.diffusion.for_request(params.extra_args)
        if cfg.gen_length > self.diffusion.gen_length:
            raise InvalidRequestError(
                f"{EXTRA_ARG_PREFIX}gen_length {cfg.gen_length} exceeds the server's {self.diffusion.gen_length}",
                EXTRA_ARG_PREFIX + "gen_length",
            )
        if prompt_len + cfg.gen_length > max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {max_model_len} tokens; the prompt ({prompt_len}) and the "
                f"diffusion canvas ({cfg.gen_length}) need {prompt_len + cfg.gen_length}",
                "prompt",
            )
        unsupported = [
            name
            for name, used in (
                ("logprobs", params.logprobs is not None),
                ("prompt_logprobs", params.prompt_logprobs is not None),
                ("structured_outputs", params.structured_outputs is not None),
                ("presence_penalty", params.presence_penalty != 0.0),
                ("frequency_penalty", params.frequency_penalty != 0.0),
                ("repetition_penalty", params.repetition_penalty != 1.0),
                ("logit_bias", bool(params.logit_bias)),
                ("min_tokens", params.min_tokens > 0),
                ("logits_processors", bool(params.logits_processors)),
                ("top_p", params.top_p < 1.0),
                ("top_k", params.top_k > 0),
                ("min_p", params.min_p > 0.0),
            )
            if used
        ]
        if unsupported:
            raise InvalidRequestError(
                f"the dparallel decoder does not support {', '.join(unsupported)} (diffusion decoding commits argmax "
                "or Gumbel-max tokens out of order)",
                unsupported[0],
            )

    def _canvas(self, seq: Sequence) -> Canvas:
        canvas = self.canvases.get(seq)
        if canvas is None:
            cfg = self.diffusion.for_request(seq.params.extra_args)
            canvas = Canvas(cfg, [self.spec.mask_token_id] * cfg.gen_length)
            self.canvases[seq] = canvas
        elif seq.num_computed == 0:  # preempted: its cache is gone
            canvas.cached = False
        return canvas

    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        results = {s.seq: SeqStep() for s in scheduled}
        # a prompt's earlier chunks need no forward of their own: every step recomputes what it reads
        work = [(s.seq, self._canvas(s.seq)) for s in scheduled if s.completes_prefix]
        if not work:
            return results
        chunks, blocks = zip(*(self._chunk(seq, canvas) for seq, canvas in work))
        logits, _ = self.runner.forward(list(chunks))
        lo = 0
        for (seq, canvas), chunk, masked in zip(work, chunks, blocks):
            rows = logits[lo : lo + len(chunk.logits_rows)]
            lo += len(chunk.logits_rows)
            results[seq] = self._commit(seq, canvas, masked, rows)
        return results

    def _chunk(self, seq: Sequence, canvas: Canvas) -> tuple[SeqChunk, list[int]]:
        """The step's forward for `seq`, and the canvas indices of the block's masked positions (its logits rows,
        in order)."""
        cfg, mask_id = canvas.config, self.spec.mask_token_id
        prompt = seq.token_ids[: seq.prompt_len]
        x = prompt + canvas.tokens  # [P + G]
        p, shift = len(prompt), int(self.spec.logits_shift)
        s = p + canvas.block * cfg.block_length
        e = s + cfg.block_length
        masked = [j - p for j in range(s, e) if x[j] == mask_id]
        w0 = s - shift  # the window's first token: with shifted logits, row j - 1 predicts position j
        if cfg.cache == "none" or not canvas.cached:
            if cfg.cache == "dual":  # cache layout: prefix, suffix, then the block
                order = list(range(w0)) + list(range(e, len(x))) + list(range(w0, e))
                first = len(x) - (e - w0)  # where the block's window sits in `order`
            else:
                order, first = list(range(len(x))), w0
            canvas.cached = cfg.cache != "none"
            tokens, start = [x[i] for i in order], 0
            positions: list[int] | None = order if cfg.cache == "dual" else None
        elif cfg.cache == "prefix":  # block and suffix over the cached prefix
            tokens, start, positions, first = x[w0:], w0, None, 0
        else:  # dual: the block over the cached prefix and suffix
            start = len(x) - (e - w0)
            tokens, positions, first = x[w0:e], list(range(w0, e)), 0
        n = len(tokens)
        rows = [first + (p + j - shift - w0) for j in masked]
        chunk = SeqChunk(
            block_table=seq.block_table,
            start=start,
            token_ids=tokens,
            logits_rows=rows,
            positions=positions,
            tree_mask=torch.ones(n, n, dtype=torch.bool),
        )
        return chunk, masked

    def _commit(self, seq: Sequence, canvas: Canvas, masked: list[int], logits: torch.Tensor) -> SeqStep:
        cfg = canvas.config
        if canvas.block_step == 0 and cfg.rule == "confidence":
            steps = (cfg.steps or cfg.gen_length) // cfg.num_blocks
            canvas.schedule = transfer_counts(len(masked), steps)
        count = cfg.k
        if cfg.rule == "confidence":
            count = canvas.schedule[min(canvas.block_step, len(canvas.schedule) - 1)]
        tokens = gumbel_argmax(logits, seq.params.temperature, seq.generator or self.sampler.generator)
        for i in choose(cfg.rule, logits, tokens, threshold=cfg.threshold, count=count).tolist():
            canvas.tokens[masked[i]] = int(tokens[i])
        canvas.block_step += 1
        lo = canvas.block * cfg.block_length
        if self.spec.mask_token_id not in canvas.tokens[lo : lo + cfg.block_length]:
            canvas.block, canvas.block_step, canvas.cached = canvas.block + 1, 0, False
        start = canvas.emitted
        while canvas.emitted < cfg.gen_length and canvas.tokens[canvas.emitted] != self.spec.mask_token_id:
            canvas.emitted += 1
        samples = [Sample(t, None) for t in canvas.tokens[start : canvas.emitted]]
        return SeqStep(samples=samples, forwarded=True, denoising_steps=1, finished=canvas.emitted == cfg.gen_length)
