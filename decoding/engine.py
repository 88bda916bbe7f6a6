"""The synchronous engine: owns the model, cache, scheduler and decoder; `step()` advances every running request."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from .config import EngineConfig, default_speculative_config
from .decoders import DECODERS
from .decoders.base import SeqStep
from .detokenizer import IncrementalDetokenizer
from .diffusion_lm import diffusion_spec
from .errors import InvalidRequestError
from .host_memory import huge_page_bytes
from .kv_cache import PagedKVCache
from .model_loader import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
from .observe import STEP_RANGE, Clock, Observers, StepObserver, StepRecord, profiled_range
from .request import Request, SeqStatus, Sequence
from .runner import ModelRunner
from .sampler import Sample, Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledSeq, Scheduler
from .silent_thought import CONFIG_KEY as SILENT_THOUGHT_KEY

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

    from .structured_output import GrammarCompiler, StructuredOutputsParams

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 32768
CPU_MAX_KV_FRACTION = 0.25  # of physical RAM


def _kv_cache_blocks(config: EngineConfig, bytes_per_token: int, device: torch.device) -> int:
    bs = config.cache.block_size
    if config.cache.kv_cache_tokens is not None:
        tokens = config.cache.kv_cache_tokens
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        tokens = int(free * config.cache.gpu_memory_utilization) // bytes_per_token
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        tokens = min(CPU_DEFAULT_KV_TOKENS, int(ram * CPU_MAX_KV_FRACTION) // bytes_per_token)
    if tokens < bs:
        raise ValueError(f"the KV cache must hold at least one block of {bs} tokens, got {tokens} tokens")
    return tokens // bs


def _huge_pages_note(device: torch.device) -> str:
    """The start-up line's note of the host memory in huge pages (`host_memory`), on a CPU whose kernel tells."""
    held = huge_page_bytes() if device.type == "cpu" else None
    return "" if held is None else f", {held >> 20} MiB of host memory in huge pages"


class LLMEngine:
    def __init__(self, config: EngineConfig, *, clock: Clock = time.perf_counter, observers: Seq[StepObserver] = ()):
        """`clock` times the steps (and the speculative decoder's mode choice); `observers` are told of every
        model forward and every step (`observe.py`)."""
        self.config = config
        self.observers = Observers(clock, observers)
        start = clock()
        mc = config.model
        self.device = resolve_device(mc.device)
        if config.speculative_config is None and config.decoder in (None, "speculative"):
            default = default_speculative_config(mc.model, self.device.type)
            if default is not None:  # the model's shipped drafter (the caller's config stays as given)
                config = self.config = dataclasses.replace(config, speculative_config=default)
                logger.info("speculative decoding with %s's drafter by default: %s", mc.model, json.dumps(default))
        # as vLLM: a speculative_config alone turns speculative decoding on
        self.decoder_name = config.decoder or ("speculative" if config.speculative_config else "autoregressive")
        if self.decoder_name not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder_name!r}; this build has: {', '.join(DECODERS)}")
        self.dtype = resolve_dtype(mc.dtype, self.device)
        self.model_path = resolve_model(mc.model)
        self.tokenizer = load_tokenizer(self.model_path, mc.trust_remote_code)
        model = load_model(self.model_path, mc, self.device, self.dtype)
        hf = model.config
        self._check_decoder(diffusion_spec(hf) is not None, getattr(hf, SILENT_THOUGHT_KEY, None) is not None)
        model_impl = DECODERS[self.decoder_name].model_impl or mc.model_impl
        if mc.model_impl not in ("auto", model_impl):
            raise ValueError(f"--decoder {self.decoder_name} runs on --model-impl {model_impl}, not {mc.model_impl}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        bytes_per_token = PagedKVCache.bytes_per_token(
            hf.num_hidden_layers, hf.num_key_value_heads, head_dim, self.dtype
        )
        num_blocks = _kv_cache_blocks(config, bytes_per_token, self.device)
        self.cache = PagedKVCache(
            hf.num_hidden_layers,
            num_blocks,
            config.cache.block_size,
            hf.num_key_value_heads,
            head_dim,
            self.dtype,
            self.device,
        )
        self.served_model_name = mc.served_model_name or mc.model
        self.vocab_size = hf.vocab_size
        self.eos_token_ids = self._eos_ids(model)
        self.sampler = Sampler(self.tokenizer, torch.Generator(device=self.device).manual_seed(config.seed))
        self.runner = ModelRunner(
            model,
            self.cache,
            self.device,
            on_forward=self.observers.on_target_forward,
            model_impl=model_impl,
            compile=not mc.enforce_eager,
        )
        self.decoder = DECODERS[self.decoder_name](self.runner, self.sampler, config, self.observers)
        self.max_model_len = self._max_model_len(getattr(hf, "max_position_embeddings", None))
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self._grammars: GrammarCompiler | None = None  # made on the first request with structured outputs
        self._grammars_lock = threading.Lock()
        logger.info(
            "engine ready in %.1f s: %s on %s/%s, decoder %s, KV cache %d tokens, max_model_len %d%s",
            clock() - start,
            self.model_path,
            self.device,
            self.dtype,
            self.decoder_name,
            num_blocks * config.cache.block_size,
            self.max_model_len,
            _huge_pages_note(self.device),
        )

    def _check_decoder(self, diffusion: bool, silent_thought: bool) -> None:
        """A masked diffusion LM decodes with dparallel (the default for one), and only diffusion LMs do; a
        silent-thought checkpoint decodes with silent-thought unless told otherwise (its plain pathways stay usable)."""
        unset = self.config.decoder is None and not self.config.speculative_config
        if silent_thought and unset:
            self.decoder_name = "silent-thought"
        elif diffusion and unset:
            self.decoder_name = "dparallel"
        elif diffusion and self.decoder_name != "dparallel":
            raise ValueError(
                f"{self.config.model.model} is a masked diffusion LM: serve it with --decoder dparallel, "
                f"not {self.decoder_name}"
            )
        elif self.config.diffusion_config is not None and self.decoder_name != "dparallel":
            raise ValueError("--diffusion-config is for --decoder dparallel (masked diffusion LMs)")

    def _max_model_len(self, model_limit: int | None) -> int:
        capacity = self.cache.num_blocks * self.cache.block_size - self.decoder.lookahead
        wanted = self.config.model.max_model_len
        if wanted is not None and wanted > capacity:
            raise ValueError(
                f"--max-model-len {wanted} does not fit the KV cache ({capacity} tokens); "
                f"raise --kv-cache-tokens or lower --max-model-len"
            )
        if wanted is not None and model_limit and wanted > model_limit:
            logger.warning("--max-model-len %d exceeds the model's %d positions", wanted, model_limit)
        return wanted or min(model_limit or capacity, capacity)

    def _eos_ids(self, model) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return {i for i in ids if i is not None}

    # ---- requests -------------------------------------------------------------------------------------------

    def check_token_ids(self, param: str, ids: Iterable[int]) -> None:
        """Raise InvalidRequestError naming `param` if any of `ids` is outside the vocabulary."""
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"{param}: token ids must be in [0, {self.vocab_size})", param)

    def compile_grammar(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """A structured-output constraint compiled for this tokenizer (cached by spec; thread-safe, so a server
        compiles off its event loop); InvalidRequestError if it does not parse."""
        with self._grammars_lock:
            if self._grammars is None:
                from .structured_output import GrammarCompiler  # xgrammar is loaded by the first request using it

                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        return self._grammars.compile(spec)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the prompt cannot be served with these parameters."""
        self._expanded_prompt(prompt_token_ids, params)

    def _expanded_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as the decoder runs it (`Decoder.expand_prompt`); InvalidRequestError if it cannot be served."""
        if params.structured_outputs is not None:
            if params.min_tokens:  # the grammar may allow only a stop token where min_tokens forbids it
                raise InvalidRequestError("min_tokens cannot be combined with structured outputs", "min_tokens")
            self.compile_grammar(params.structured_outputs)
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt must contain at least one token", "prompt")
        self.check_token_ids("prompt", prompt_token_ids)
        self.check_token_ids("stop_token_ids", params.stop_token_ids)
        self.check_token_ids("logit_bias", params.logit_bias)
        prompt_token_ids = self.decoder.expand_prompt(prompt_token_ids, params)
        n = len(prompt_token_ids)
        self.decoder.validate(n, params, self.max_model_len)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} tokens",
                "prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion)",
                "max_tokens",
            )
        return prompt_token_ids

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        prompt_token_ids = self._expanded_prompt(prompt_token_ids, params)
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        stop_ids = frozenset(params.stop_token_ids) | eos
        req = Request(request_id, prompt, list(prompt_token_ids), params, stop_ids)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        compiled = None if params.structured_outputs is None else self.compile_grammar(params.structured_outputs)
        for index in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + index)
            seq = Sequence(
                self._next_seq_id,
                req,
                index,
                list(prompt_token_ids),
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
                gen,
                logprobs=[] if params.logprobs is not None else None,
            )
            if compiled is not None:
                from .structured_output import SequenceGrammar

                seq.grammar = SequenceGrammar(compiled, self.vocab_size)
            self._next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                if not seq.finished:
                    self._finish(seq, "abort")
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Advance every scheduled sequence by one decoder step; return the requests that changed."""
        with profiled_range(STEP_RANGE):
            return self._step()

    def _step(self) -> list[Request]:
        scheduled = self.scheduler.schedule(self.decoder.slots_ahead)
        if not scheduled:
            return []
        start, forwards = self.observers.clock(), dict(self.observers.forwards)
        try:
            results = self.decoder.step(scheduled)
        except Exception as e:  # cannot tell which request caused it: fail this step's requests, keep serving
            logger.exception("decoder step failed")
            failed = {s.seq.request for s in scheduled}
            for req in failed:
                self._fail(req, f"{type(e).__name__}: {e}")
            return list(failed)
        now = time.time()
        changed: dict[str, Request] = {}
        for s in scheduled:
            seq, res = s.seq, results[s.seq]
            req = seq.request
            if res.error is not None:
                self._fail(req, str(res.error))
                changed[req.request_id] = req
                continue
            if seq.finished:  # a sibling's failure ended it in this loop
                continue
            if res.prompt_logprobs:
                assert req.prompt_logprobs is not None
                req.prompt_logprobs += res.prompt_logprobs
            seq.num_computed += s.num_new + max(0, len(res.samples) - 1)
            if res.masked_slots:
                seq.add_kv_hole(res.masked_slots)
            seq.denoising_steps += res.denoising_steps
            seq.sequential_forwards += res.sequential_forwards
            if res.forwarded:
                seq.target_forwards += 1
                seq.draft_tokens += res.draft_tokens
                seq.accepted_tokens += res.accepted_tokens
                if res.draft_tokens:
                    seq.count_accepted(res.accepted_tokens)
            for sample in res.samples:
                self._append(seq, sample)
                if seq.finished:
                    break
            if res.finished and not seq.finished:
                seq.text += seq.detokenizer.flush()
                self._finish(seq, "length")
                changed[req.request_id] = req
            if res.samples:
                req.first_token_time = req.first_token_time or now
                changed[req.request_id] = req
        for req in changed.values():
            if req.finished:
                req.finished_time = now
                self.requests.pop(req.request_id, None)
        if self.observers.observers:
            self.observers.step(self._step_record(scheduled, results, start, forwards))
        return list(changed.values())

    def _step_record(
        self, scheduled: list[ScheduledSeq], results: dict[Sequence, SeqStep], start: float, forwards: dict[str, int]
    ) -> StepRecord:
        decoding = [s for s in scheduled if s.completes_prefix]
        done = self.observers.forwards
        return StepRecord(
            mode="draft" if any(r.draft_tokens for r in results.values()) else "plain",
            sequences=len(decoding),
            prompt_tokens=sum(s.num_new for s in scheduled) - len(decoding),
            committed_tokens=sum(len(results[s.seq].samples) for s in decoding),
            target_forwards=done["target"] - forwards["target"],
            draft_forwards=done["draft"] - forwards["draft"],
            seconds=self.observers.clock() - start,
        )

    def _append(self, seq: Sequence, sample: Sample) -> None:
        """Commit one token: logprobs, detokenization, then the stop conditions in vLLM's order."""
        p = seq.params
        token = sample.token_id
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            assert sample.logprobs is not None  # sampled with logprobs, as the request asked for them
            seq.logprobs.append(sample.logprobs)
        if seq.grammar is not None and not seq.grammar.accept(token):  # only if a logits processor masked all it allows
            self._fail(seq.request, f"token {token} breaks the request's grammar (nothing it allows was left)")
            return
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            self._finish(seq, "stop", token if token in p.stop_token_ids else None)
            return
        if seq.grammar is not None and seq.grammar.terminated:  # complete, its stop token taken (ignore_eos)
            self._finish(seq, "stop")
            return
        delta = seq.detokenizer.add(token)
        if delta:
            seq.text += delta
            if p.stop and seq.num_output >= p.min_tokens and self._check_stop_strings(seq, len(delta)):
                return
        max_tokens = p.max_tokens or self.config.default_max_tokens or self.max_model_len
        if seq.num_output >= max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.text += seq.detokenizer.flush()
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - delta_len - longest + 1)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        seq.text = seq.text[: at + len(stop) if seq.params.include_stop_str_in_output else at]
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.remove(seq)

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        for seq in req.seqs:
            if not seq.finished:
                self._finish(seq, "error")
        req.finished_time = time.time()
        self.requests.pop(req.request_id, None)
